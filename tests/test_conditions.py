"""Molecule (SMILES -> Morgan fingerprint) and scalar (dose) conditions: encoding, null / dropout, data errors,
generation for drugs and doses never seen in training, and the export that loads without ddsc."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import pytest
import torch
from without_ddsc import run_without

from ddsc.cli import main
from ddsc.config import ConfigError
from ddsc.data.binning_config import BinningConfig
from ddsc.data.chemistry import _fingerprint, morgan_fingerprint, tanimoto
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.vocab import GeneVocab
from ddsc.inference import Predictor
from ddsc.model.conditions import NULL, VALUE, ZERO, encode_conditions
from ddsc.model.config import ConditionConfig, ModelConfig
from ddsc.model.dit import DiT
from ddsc.model.export import write_hf_folder
from ddsc.model.hf import DDSCConfig, DDSCModel
from ddsc.train.run import check_condition_values, resolve_model_config

K = 8
N_VOCAB = 40
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "Cn1cnc2c1c(=O)n(C)c(=O)n2C"
IBUPROFEN = "CC(C)Cc1ccc(cc1)C(C)C(=O)O"
NAPROXEN = "COc1ccc2cc(ccc2c1)C(C)C(=O)O"
SMILES = ConditionConfig("smiles", kind="molecule", column="canonical_smiles", dropout=0.0)
DOSE = ConditionConfig("dose", kind="scalar", dropout=0.0)
LINE = ConditionConfig("cell_line_id", num_labels=2, dropout=0.0)


def test_fingerprint_is_deterministic_canonical_and_cached():
    # ethanol's Morgan bits (radius 2, 2048 bits) as RDKit computes them: the same in every process and order
    np.testing.assert_array_equal(np.flatnonzero(morgan_fingerprint("CCO")), [80, 222, 294, 807, 1057, 1410])
    assert np.array_equal(morgan_fingerprint("OCC"), morgan_fingerprint("CCO"))  # same molecule, other SMILES
    aspirin = morgan_fingerprint(ASPIRIN)
    assert aspirin.shape == (2048,) and aspirin.dtype == np.uint8 and aspirin.sum() == 24
    assert morgan_fingerprint(ASPIRIN, radius=1).sum() < aspirin.sum()
    assert morgan_fingerprint(ASPIRIN, bits=512).shape == (512,)
    hits = _fingerprint.cache_info().hits
    assert morgan_fingerprint(ASPIRIN) is aspirin and _fingerprint.cache_info().hits == hits + 1
    assert not aspirin.flags.writeable  # the cached array cannot be changed by a caller
    similarity = tanimoto(np.stack([aspirin, morgan_fingerprint("OC(=O)c1ccccc1O")]), morgan_fingerprint(CAFFEINE))
    assert similarity.shape == (2, 1) and similarity.max() < 0.2
    assert tanimoto(aspirin, aspirin)[0, 0] == 1.0
    with pytest.raises(ValueError, match="not a valid SMILES"):
        morgan_fingerprint("C1CC(")


def test_cond_layout_null_and_dose_zero():
    cond = encode_conditions(
        [LINE, SMILES, DOSE],
        {"cell_line_id": ["b", "a", ""], "smiles": [ASPIRIN, "CCO", ""], "dose": ["0.5", "0", ""]},
        3,
        LabelVocab({"cell_line_id": ["a", "b"]}).encode,
    )
    assert cond.shape == (3, 1 + 2049 + 2) and cond.dtype == np.float32
    assert cond[:, 0].tolist() == [2, 1, 0] and cond[:, 1].tolist() == [VALUE, VALUE, NULL]
    np.testing.assert_array_equal(cond[0, 2:2050], morgan_fingerprint(ASPIRIN))
    # dose 0 (the vehicle control) is its own state, not null and not log10(0); other doses are log10(uM)
    np.testing.assert_allclose(cond[:, -2:], [[VALUE, np.log10(0.5)], [ZERO, 0.0], [NULL, 0.0]], rtol=1e-6)
    assert not cond[2].any()  # null everywhere: what zeros_like(cond) gives guidance
    labels_only = encode_conditions([LINE], {"cell_line_id": ["a"]}, 1, LabelVocab({"cell_line_id": ["a", "b"]}).encode)
    assert labels_only.dtype == np.int64 and labels_only.tolist() == [[1]]


def tiny_dit(*conditions: ConditionConfig) -> DiT:
    torch.manual_seed(0)
    dit = DiT(
        ModelConfig(d_model=32, n_layers=1, n_heads=2, gene_vocab_size=N_VOCAB, num_bins=K, conditions=list(conditions))
    )
    for module in dit.modules():  # off DiT's zero init, so that conditions change the logits
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    return dit


def test_molecule_null_and_dropout_paths():
    gene_ids = torch.randint(3, N_VOCAB, (1, 6)).expand(4, -1)  # the same cell four times
    expr, mask = torch.randint(0, K, (1, 6)).expand(4, -1), torch.ones(4, 6, dtype=torch.bool)
    cond = torch.from_numpy(encode_conditions([SMILES], {"smiles": [ASPIRIN, CAFFEINE, "CCO", ASPIRIN]}, 4))
    dit = tiny_dit(SMILES).eval()
    out = dit(gene_ids, expr, mask, cond)
    null = dit(gene_ids, expr, mask, None)
    torch.testing.assert_close(null, dit(gene_ids, expr, mask, torch.zeros_like(cond)))
    assert (out - null).abs().amax(dim=(1, 2)).min() > 1e-3  # every molecule moves its cell off the null
    assert (out[0] - out[1]).abs().max() > 1e-3 and torch.equal(out[0], out[3])
    # a zero state means null whatever bits follow it (the learned null vector, not an MLP of zero bits)
    stale = cond.clone()
    stale[:, 0] = NULL
    torch.testing.assert_close(dit(gene_ids, expr, mask, stale), null)
    # training with dropout 1 always uses the null; with dropout 0 never
    always = tiny_dit(ConditionConfig("smiles", kind="molecule", dropout=1.0)).train()
    torch.testing.assert_close(always(gene_ids, expr, mask, cond), always(gene_ids, expr, mask, None))
    never = tiny_dit(SMILES).train()
    torch.testing.assert_close(never(gene_ids, expr, mask, cond), out)
    # gradients reach the fingerprint MLP and the null vector
    dit.train()
    (dit(gene_ids, expr, mask, cond).sum() + dit(gene_ids, expr, mask, None).sum()).backward()
    encoder = dit.cond_embeddings[0]
    assert encoder.mlp[0].weight.grad.abs().sum() > 0 and encoder.states.weight.grad[NULL].abs().sum() > 0


def test_fingerprint_bit_dropout_masks_bits_in_training_only():
    spec = ConditionConfig("smiles", kind="molecule", dropout=0.0, bit_dropout=0.5)
    cond = torch.from_numpy(encode_conditions([spec], {"smiles": [ASPIRIN] * 64}, 64))
    encoder = tiny_dit(spec).cond_embeddings[0]
    bits = cond[:, 1:].float()
    encoder.train()
    torch.manual_seed(0)
    kept = encoder.features(bits)
    on = bits > 0
    assert set(kept[on].unique().tolist()) == {0.0, 2.0} and (kept[~on] == 0).all()  # dropped, or scaled by 1/(1-p)
    assert abs(float((kept[on] == 0).float().mean()) - 0.5) < 0.05
    assert not torch.equal(kept[0], kept[1])  # a fresh mask per cell
    encoder.eval()
    torch.testing.assert_close(encoder.features(bits), bits)
    drop = torch.zeros(64, dtype=torch.bool)
    torch.testing.assert_close(encoder(cond, drop), tiny_dit(spec).cond_embeddings[0].eval()(cond, drop))
    with pytest.raises(ValueError, match="bit_dropout"):
        ConditionConfig("smiles", kind="molecule", bit_dropout=1.0)


def test_kernel_molecule_encoder_mixes_reference_vectors_by_tanimoto_and_leaves_a_cells_own_drug_out():
    spec = ConditionConfig(
        "smiles", kind="molecule", dropout=0.0, encoder="kernel", references=[ASPIRIN, CAFFEINE, IBUPROFEN]
    )
    encoder = tiny_dit(dataclasses.replace(spec, reference_dropout=0.5)).cond_embeddings[0]
    smiles = [ASPIRIN, NAPROXEN, ""]  # a seen drug, an unseen one, the null
    cond = torch.from_numpy(encode_conditions([spec], {"smiles": smiles}, 3))
    # the reference computed another way: NumPy Tanimoto of RDKit fingerprints, softmax(10 x similarity)
    similarity = tanimoto(np.stack([morgan_fingerprint(s) for s in smiles[:2]]), encoder.references.numpy())
    weights = np.exp(10 * similarity) / np.exp(10 * similarity).sum(1, keepdims=True)
    vectors = encoder.vectors.weight.detach().double().numpy()
    drop = torch.zeros(3, dtype=torch.bool)
    out = encoder.eval()(cond, drop).detach().numpy()
    np.testing.assert_allclose(out[:2], weights @ vectors, rtol=1e-5, atol=1e-6)
    assert weights[0, 0] > 0.99  # a seen drug is (almost) its own vector, as a label is
    assert weights[1].argmax() == 2 and weights[1, 2] < 0.99  # naproxen: mostly the other profen, not only it
    np.testing.assert_allclose(out[2], encoder.states.weight[NULL].detach().numpy())
    # training: the seen drug's own vector leaves its mix in about half the cells; the unseen drug has none to leave
    encoder.train()
    torch.manual_seed(0)
    many = encoder(cond[[0] * 200 + [1] * 50], torch.zeros(250, dtype=torch.bool)).detach().numpy()
    others = np.exp(10 * similarity[0, 1:]) / np.exp(10 * similarity[0, 1:]).sum()
    left_out = np.isclose(many[:200], others @ vectors[1:], atol=1e-5).all(1)
    kept = np.isclose(many[:200], weights[0] @ vectors, atol=1e-5).all(1)
    assert (left_out ^ kept).all() and 0.4 < left_out.mean() < 0.6
    np.testing.assert_allclose(many[200:], np.tile(weights[1] @ vectors, (50, 1)), rtol=1e-5, atol=1e-6)
    encoder(cond, drop).sum().backward()
    assert (encoder.vectors.weight.grad.abs().sum(1) > 0).all()  # every reference vector is trained
    # cast whole (DeepSpeed bf16 casts buffers too): the same float32 mix, of the bf16-rounded vectors
    encoder.eval().to(torch.bfloat16)
    rounded = encoder.vectors.weight.detach().double().numpy()
    out = encoder(cond.to(torch.bfloat16), drop)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[:2].detach().numpy(), weights @ rounded, rtol=1e-5, atol=1e-6)


def test_kernel_references_come_from_the_labels_and_bad_settings_are_named():
    spec = ConditionConfig("smiles", kind="molecule", column="canonical_smiles", encoder="kernel")
    labels = LabelVocab({"canonical_smiles": [ASPIRIN, CAFFEINE]})
    (resolved,) = resolve_model_config(ModelConfig(conditions=[spec]), labels).conditions
    assert resolved.references == [ASPIRIN, CAFFEINE]
    given = dataclasses.replace(spec, references=[IBUPROFEN, NAPROXEN])
    assert resolve_model_config(ModelConfig(conditions=[given]), labels).conditions[0].references == given.references
    with pytest.raises(ConfigError, match=r"smiles: a kernel encoder needs data.labels\['canonical_smiles'\]"):
        resolve_model_config(ModelConfig(conditions=[spec]), LabelVocab({"drug": ["a"]}))
    with pytest.raises(ValueError, match="smiles: a kernel encoder needs >= 2 references"):
        tiny_dit(dataclasses.replace(spec, references=[ASPIRIN]))
    with pytest.raises(ValueError, match="encoder: must be mlp or kernel"):
        ConditionConfig("smiles", kind="molecule", encoder="tree")
    with pytest.raises(ValueError, match="reference_dropout: must be in"):
        ConditionConfig("smiles", kind="molecule", encoder="kernel", reference_dropout=1.0)


def test_scalar_condition_for_an_unseen_dose_is_smooth_and_distinct():
    dit = tiny_dit(DOSE).eval()
    gene_ids = torch.randint(3, N_VOCAB, (1, 6)).expand(5, -1)
    expr, mask = torch.randint(0, K, (1, 6)).expand(5, -1), torch.ones(5, 6, dtype=torch.bool)
    cond = torch.from_numpy(encode_conditions([DOSE], {"dose": ["0.5", "0.7", "0.7001", "0", ""]}, 5))
    out = dit(gene_ids, expr, mask, cond)
    near, far = (out[1] - out[2]).abs().max(), (out[0] - out[1]).abs().max()
    assert far > 0.1 and near < 0.01 * far  # a smooth function of log dose
    assert (out[3] - out[4]).abs().max() > 1e-3 and (out[3] - out[0]).abs().max() > 1e-3  # zero != null != 0.5


def samples(smiles: list[str], doses: list[str]) -> list[dict]:
    return [
        {
            "cell_id": f"cell-{i}",
            "genes": np.array([3, 5, 7], np.int32),
            "counts": np.array([1, 2, 3], np.uint16),
            "canonical_smiles": s,
            "dose": d,
        }
        for i, (s, d) in enumerate(zip(smiles, doses, strict=True))
    ]


def test_collator_builds_and_names_the_cell_of_a_bad_value():
    collator = CellCollator(8, BinningConfig(num_bins=K), conditions=[SMILES, DOSE])
    batch = collator(samples([ASPIRIN, "CS(C)=O"], ["5.0", "0.0"]))
    assert batch["cond"].shape == (2, 2049 + 2) and batch["cond"].dtype == torch.float32
    assert batch["cond"][:, -2].tolist() == [VALUE, ZERO]
    with pytest.raises(ValueError, match=r"cell 'cell-1': canonical_smiles 'C1CC\(' is not a valid SMILES"):
        collator(samples([ASPIRIN, "C1CC("], ["5.0", "5.0"]))
    with pytest.raises(ValueError, match="cell 'cell-2': dose is missing"):
        collator(samples([ASPIRIN] * 3, ["5.0", "0.5", ""]))
    with pytest.raises(ValueError, match="cell 'cell-0': dose 'high' is not a number"):
        collator(samples([ASPIRIN], ["high"]))


def test_distinct_values_are_checked_before_training():
    model = ModelConfig(conditions=[SMILES, DOSE])
    check_condition_values(model, LabelVocab({"canonical_smiles": [ASPIRIN, CAFFEINE], "dose": ["0.0", "0.5"]}))
    bad = LabelVocab({"canonical_smiles": [ASPIRIN, "C1CC(", "nope"], "dose": ["0.5"]})
    with pytest.raises(ConfigError, match=r"smiles: 2 of 3 distinct values of column 'canonical_smiles'.*'C1CC\('"):
        check_condition_values(model, bad)
    with pytest.raises(ConfigError, match="dose: 1 of 2 distinct values.*'-1' must be a finite number >= 0"):
        check_condition_values(model, LabelVocab({"canonical_smiles": [ASPIRIN], "dose": ["0.5", "-1"]}))
    with pytest.raises(ConfigError, match="no 'canonical_smiles' column"):
        check_condition_values(model, LabelVocab({"dose": ["0.5"]}))


def molecule_model_dir(tmp_path, smiles: ConditionConfig = SMILES) -> str:
    config = DDSCConfig.from_model_config(tiny_dit(LINE, smiles, DOSE).cfg, max_genes=16, binning={"num_bins": K})
    model = DDSCModel(config)
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    vocab = GeneVocab.from_features(
        [f"ENSG{i:011d}" for i in range(N_VOCAB - 3)], [f"G{i}" for i in range(N_VOCAB - 3)]
    )
    folder = tmp_path / "hf"
    write_hf_folder(model, folder, vocab, LabelVocab({"cell_line_id": ["L0", "L1"]}))
    return str(folder)


def test_generate_for_an_unseen_molecule_and_dose(tmp_path, capsys):
    folder = molecule_model_dir(tmp_path)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["conditions"]
    assert [(c["kind"], c["fingerprint_radius"], c["fingerprint_bits"]) for c in saved[1:]] == [
        ("molecule", 2, 2048),
        ("scalar", 2, 2048),
    ]
    predictor = Predictor.from_pretrained(folder, progress=False)
    panel = [f"G{i}" for i in range(12)]

    def cells(smiles: str, dose: str = "0.5", seed: int = 3) -> np.ndarray:
        conditions = {"cell_line_id": ["L1"], "smiles": [smiles], "dose": [dose]}
        return predictor.generate(panel, conditions, n_cells=16, steps=4, seed=seed).X

    aspirin = cells(ASPIRIN)
    np.testing.assert_array_equal(aspirin, cells(ASPIRIN))  # same molecule, same seed: same cells
    assert (aspirin != cells(CAFFEINE)).mean() > 0.2  # another molecule: other cells
    assert (aspirin != cells(ASPIRIN, dose="2.7")).mean() > 0.05  # an unseen dose moves them too
    with pytest.raises(ValueError, match="condition 'smiles': canonical_smiles 'C1CC\\(' is not a valid SMILES"):
        cells("C1CC(")
    out = tmp_path / "gen.h5ad"
    args = ["generate", "--model", folder, "--genes", "G1,G2,G3", "--n-cells", "3", "--output", str(out)]
    assert main([*args, "--condition", f"smiles={ASPIRIN}", "--condition", "dose=0.5", "--steps", "2"]) == 0
    assert main([*args, "--condition", "smiles=C1CC(", "--steps", "2"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: condition 'smiles': canonical_smiles 'C1CC(' is not a valid SMILES string")
    )


def logits_with_and_without_ddsc(folder: str, tmp_path, blocked=("ddsc",)):
    """The logits of one batch from ``DDSCModel`` and, in a process where ``blocked`` cannot be imported, from
    ``AutoModel``; and that process."""
    model = DDSCModel.from_pretrained(folder).eval()
    values = {"smiles": [NAPROXEN, CAFFEINE], "dose": ["0.5", "0"], "cell_line_id": ["L0", ""]}
    labels = {"cell_line_id": ["L0", "L1"]}
    gene_ids, expr = torch.randint(3, N_VOCAB, (2, 6)), torch.randint(0, K, (2, 6))
    np.savez(tmp_path / "batch.npz", gene_ids=gene_ids.numpy(), expr=expr.numpy())
    with torch.no_grad():
        reference = model(
            gene_ids, expr, torch.ones(2, 6, dtype=torch.bool), model.encode_conditions(values, 2, labels)
        )
    script = textwrap.dedent(f"""
        import numpy as np, torch, transformers
        model = transformers.AutoModel.from_pretrained({folder!r}, trust_remote_code=True).eval()
        b = {{k: torch.from_numpy(v) for k, v in np.load({str(tmp_path / "batch.npz")!r}).items()}}
        with torch.no_grad():
            cond = model.encode_conditions({values!r}, 2, {labels!r})
            out = model(b["gene_ids"], b["expr"], torch.ones(2, 6, dtype=torch.bool), cond)
        np.save({str(tmp_path / "logits.npy")!r}, out.numpy())
        assert not any(m.split(".")[0] == "ddsc" for m in sys.modules)
    """)
    done = run_without(script, tmp_path, blocked)
    return reference, (np.load(tmp_path / "logits.npy") if done.returncode == 0 else None), done


def test_molecule_export_loads_without_ddsc_and_says_when_rdkit_is_missing(tmp_path):
    folder = molecule_model_dir(tmp_path)
    reference, logits, done = logits_with_and_without_ddsc(folder, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(logits, reference.numpy())
    # without RDKit the model still loads; only fingerprinting a SMILES fails, saying what to install
    _, _, done = logits_with_and_without_ddsc(folder, tmp_path, blocked=("ddsc", "rdkit"))
    assert done.returncode != 0 and "molecule conditions need RDKit" in done.stderr
    assert "from_pretrained" not in done.stderr.splitlines()[-3]  # it failed in encode_conditions, after loading


def test_kernel_molecule_export_keeps_its_references_and_loads_without_ddsc(tmp_path):
    kernel = dataclasses.replace(SMILES, encoder="kernel", references=[ASPIRIN, CAFFEINE, IBUPROFEN])
    folder = molecule_model_dir(tmp_path, kernel)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["conditions"][1]
    assert (saved["encoder"], saved["references"], saved["kernel_sharpness"]) == ("kernel", kernel.references, 10.0)
    reference, logits, done = logits_with_and_without_ddsc(folder, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(logits, reference.numpy())
    # the reference fingerprints are computed when the model is built, so without RDKit it cannot load
    _, _, done = logits_with_and_without_ddsc(folder, tmp_path, blocked=("ddsc", "rdkit"))
    assert done.returncode != 0 and "molecule conditions need RDKit" in done.stderr
