"""DiT: output contract, padding invariance, permutation equivariance, conditioning, bf16, FLOP count."""

import pytest
import torch
from torch import nn

from ddsc.data.tokens import GENE_CLS, GENE_PAD, ExpressionTokens
from ddsc.model.config import ConditionConfig, ModelConfig
from ddsc.model.dit import DiT

K = 6
TOKENS = ExpressionTokens(K)


def random_model(**overrides) -> DiT:
    """A tiny DiT with every weight random: adaLN-Zero and the zero head would hide bugs at initialisation."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", gene_vocab_size=50, num_bins=K, **overrides)
    model = DiT(cfg)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model.eval()


def random_batch(batch_size=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(3, 50, (batch_size, length), generator=g)
    expr = torch.randint(0, K + 1, (batch_size, length), generator=g)  # bins and the mask token
    gene_ids[:, 0], expr[:, 0] = GENE_CLS, TOKENS.cls
    mask = torch.ones(batch_size, length, dtype=torch.bool)
    return gene_ids, expr, mask


def test_logits_shape_dtype_and_zero_init_head():
    gene_ids, expr, mask = random_batch()
    model = DiT(ModelConfig.from_preset("tiny", gene_vocab_size=50, num_bins=K))
    logits = model(gene_ids, expr, mask)
    assert logits.shape == (3, 9, K) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.zeros_like(logits))  # adaLN-Zero + zero head: uniform predictions at init
    assert model.hidden(gene_ids, expr, mask).shape == (3, 9, 64)


def test_padding_never_changes_real_positions():
    model = random_model()
    gene_ids, expr, mask = random_batch()
    reference = model(gene_ids, expr, mask)
    pad = 5
    padded = model(
        torch.cat([gene_ids, torch.full((3, pad), GENE_PAD)], 1),
        torch.cat([expr, torch.full((3, pad), TOKENS.pad)], 1),
        torch.cat([mask, torch.zeros(3, pad, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(padded[:, :9], reference, rtol=1e-5, atol=1e-5)
    # Padding in the middle of a cell, holding garbage tokens, is just as invisible.
    garbage = torch.cat([gene_ids[:, :4], torch.randint(3, 50, (3, 2)), gene_ids[:, 4:]], 1)
    garbage_expr = torch.cat([expr[:, :4], torch.randint(0, K, (3, 2)), expr[:, 4:]], 1)
    middle_mask = torch.cat([mask[:, :4], torch.zeros(3, 2, dtype=torch.bool), mask[:, 4:]], 1)
    middle = model(garbage, garbage_expr, middle_mask)
    torch.testing.assert_close(torch.cat([middle[:, :4], middle[:, 6:]], 1), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_unpadded_attention_equals_the_masked_reference(padded):
    """Same weights, same cells: the real-token path gives the masked path's logits and gradients."""
    unpadded, masked = random_model(time_conditioning=True), random_model(time_conditioning=True, attention="masked")
    gene_ids, expr, mask = random_batch(batch_size=4, length=11)
    if padded:
        mask[1, 6:] = mask[3, 2:5] = False  # a short cell and a hole in the middle of one
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    outputs = {}
    for name, model in (("unpadded", unpadded), ("masked", masked)):
        logits = model(gene_ids, expr, mask, t=t)
        (logits[mask] ** 2).sum().backward()
        outputs[name] = logits
    torch.testing.assert_close(outputs["unpadded"][mask], outputs["masked"][mask], rtol=0, atol=1e-5)
    if padded:
        assert torch.equal(outputs["unpadded"][~mask], torch.zeros_like(outputs["unpadded"][~mask]))
    for (name, a), b in zip(unpadded.named_parameters(), masked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_padded_cell_equals_the_same_cell_alone():
    model = random_model()
    gene_ids, expr, mask = random_batch(batch_size=3, length=10)
    mask[1, 4:] = False
    together = model(gene_ids, expr, mask)
    alone = model(gene_ids[1:2, :4], expr[1:2, :4], mask[1:2, :4])
    torch.testing.assert_close(together[1:2, :4], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["unpadded", "masked"])
def test_permuting_genes_permutes_outputs(attention):
    model = random_model(attention=attention)
    gene_ids, expr, mask = random_batch()
    mask[0, 7:] = False
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    reference = model(gene_ids, expr, mask)
    permuted = model(gene_ids[:, perm], expr[:, perm], mask[:, perm])
    torch.testing.assert_close(permuted[mask[:, perm]], reference[:, perm][mask[:, perm]], rtol=1e-5, atol=1e-5)


def test_conditions_null_label_and_dropout():
    conditions = [
        ConditionConfig("drug", dropout=1.0, num_labels=4),
        ConditionConfig("dose", dropout=0.0, num_labels=2),
    ]
    model = random_model(conditions=conditions)
    gene_ids, expr, mask = random_batch()
    cond = torch.tensor([[1, 2], [4, 1], [2, 0]])
    conditional = model(gene_ids, expr, mask, cond)
    assert not torch.allclose(conditional, model(gene_ids, expr, mask, torch.zeros_like(cond)))
    torch.testing.assert_close(model(gene_ids, expr, mask, None), model(gene_ids, expr, mask, torch.zeros_like(cond)))
    model.train()  # drug is always dropped to null, dose never
    dropped = model(gene_ids, expr, mask, cond)
    torch.testing.assert_close(
        dropped, model.eval()(gene_ids, expr, mask, torch.stack([0 * cond[:, 0], cond[:, 1]], 1))
    )
    with pytest.raises(ValueError, match="num_labels"):
        DiT(ModelConfig.from_preset("tiny", conditions=[ConditionConfig("drug")]))


def test_time_conditioning_uses_t():
    model = random_model(time_conditioning=True)
    gene_ids, expr, mask = random_batch()
    early, late = (model(gene_ids, expr, mask, t=torch.full((3,), t)) for t in (0.1, 0.9))
    assert (early - late).abs().max() > 1e-3
    with pytest.raises(ValueError, match="time"):
        model(gene_ids, expr, mask)


def test_bf16_autocast_on_cpu_keeps_float32_head():
    model = random_model()
    gene_ids, expr, mask = random_batch()
    dtypes = {}
    for name in ("blocks.0.attn.qkv", "blocks.0.adaln.1", "final_adaln.1"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: dtypes.__setitem__(name, out.dtype)
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(gene_ids, expr, mask)
    assert logits.dtype == torch.float32
    # Matmuls over positions run in bf16; the once-per-cell adaLN maps stay float32 (no weight casts).
    assert dtypes == {
        "blocks.0.attn.qkv": torch.bfloat16,
        "blocks.0.adaln.1": torch.float32,
        "final_adaln.1": torch.float32,
    }
    reference = model(gene_ids, expr, mask)
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_learns_without_any_condition():
    """adaLN-Zero with an all-zero conditioning vector still trains (through the modulation biases)."""
    torch.manual_seed(0)
    model = DiT(ModelConfig.from_preset("tiny", gene_vocab_size=50, num_bins=K))
    gene_ids, expr, mask = random_batch(batch_size=8, length=12)
    target = gene_ids % K  # the bin is a function of the gene: learnable from the gene embedding alone
    masked_expr = torch.full_like(expr, TOKENS.mask)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(gene_ids, masked_expr, mask).flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(K))).item(), abs=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_flops_per_token_counts_matmul_weights():
    model = DiT(ModelConfig.from_preset("small", gene_vocab_size=100, num_bins=K))
    per_position = sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and "adaln" not in name
    )
    assert model.flops_per_token(128) == 6 * per_position + 12 * 4 * 256 * 128
    mask = torch.zeros(3, 128, dtype=torch.bool)
    mask[0, :128], mask[1, :50], mask[2, :7] = True, True, True  # real lengths 128, 50, 7; padded to 128
    assert model.flops(mask) == sum(model.flops_per_token(n) * n for n in (128, 50, 7))
    assert model.num_params() - model.num_params(exclude_embeddings=True) == 100 * 256 + (K + 3) * 256


@pytest.mark.parametrize(("preset", "low", "high"), [("ddsc", 170e6, 180e6), ("xl", 0.95e9, 1.1e9)])
def test_preset_sizes_match_their_comments_and_the_closed_form(preset, low, high):
    """Parameter count = embeddings + 18 d^2 + 15 d per block (attention 4, MLP 8, adaLN 6; biases) + final adaLN + head."""
    cfg = ModelConfig.from_preset(preset, num_bins=51)
    with torch.device("meta"):
        params = DiT(cfg).num_params()
    d, vocab = cfg.d_model, cfg.gene_vocab_size
    closed_form = (vocab + 51 + 3) * d + cfg.n_layers * (18 * d * d + 15 * d) + (2 * d * d + 2 * d) + (d * 51 + 51)
    assert params == closed_form
    assert low < params < high


@pytest.mark.slow
def test_compiled_blocks_match_eager_with_and_without_padding():
    """``parallelism.compile``: one fullgraph per block (inductor on CPU). Inductor fuses the point-wise ops and
    reorders float32 reductions, so outputs and gradients agree to float32 rounding, not bitwise: measured
    2e-6 of each gradient tensor's largest entry; the bound is 1e-5."""
    eager, compiled = random_model(), random_model()
    compiled.compile_blocks()
    gene_ids, expr, mask = random_batch(batch_size=4, length=12)
    padded = mask.clone()
    padded[1, 7:] = False
    for attention_mask in (mask, padded):
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(gene_ids, expr, attention_mask)
            (logits[attention_mask] ** 2).sum().backward()
            results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (logits_e, grads_e), (logits_c, grads_c) = results
        torch.testing.assert_close(logits_c[attention_mask], logits_e[attention_mask], rtol=0, atol=1e-4)
        for name, grad in grads_e.items():
            assert (grads_c[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-6), name
    assert all(block.compiled is not None for block in compiled.blocks)
