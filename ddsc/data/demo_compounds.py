"""The demo drugs: public structures of well-known compounds, as ``canonical_smiles``; families (profens,
quinazolines, xanthines, steroids, ...) share substructures, which is what lets a molecule-conditioned model
carry what it learned about one drug to its relatives (``ddsc.data.demo_data``)."""

from __future__ import annotations

# (name, SMILES) of the demo drugs, in the order they are used: demodrug_a is the first. Families are interleaved
# so that a few drugs already differ and more drugs add relatives of the first ones.
COMPOUNDS: tuple[tuple[str, str], ...] = (
    ("aspirin", "CC(=O)Oc1ccccc1C(=O)O"),
    ("imatinib", "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1"),
    ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C"),
    ("ibuprofen", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"),
    ("gefitinib", "COc1cc2ncnc(Nc3ccc(F)c(Cl)c3)c2cc1OCCCN1CCOCC1"),
    ("dexamethasone", "CC1CC2C3CCC4=CC(=O)C=CC4(C)C3(F)C(O)CC2(C)C1(O)C(=O)CO"),
    ("gemcitabine", "Nc1ccn(C2OC(CO)C(O)C2(F)F)c(=O)n1"),
    ("tamoxifen", "CCC(=C(c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1"),
    ("vorinostat", "ONC(=O)CCCCCCC(=O)Nc1ccccc1"),
    ("chlorambucil", "OC(=O)CCCc1ccc(N(CCCl)CCCl)cc1"),
    ("naproxen", "COc1ccc2cc(ccc2c1)C(C)C(=O)O"),
    ("erlotinib", "COCCOc1cc2ncnc(Nc3cccc(c3)C#C)c2cc1OCCOC"),
    ("theophylline", "Cn1c2nc[nH]c2c(=O)n(C)c1=O"),
    ("prednisolone", "CC12CC(O)C3C(CCC4=CC(=O)C=CC34C)C1CCC2(O)C(=O)CO"),
    ("cytarabine", "Nc1ccn(C2OC(CO)C(O)C2O)c(=O)n1"),
    ("toremifene", "CN(C)CCOc1ccc(cc1)C(=C(CCCl)c1ccccc1)c1ccccc1"),
    ("belinostat", "ONC(=O)C=Cc1cccc(c1)S(=O)(=O)Nc1ccccc1"),
    ("melphalan", "NC(Cc1ccc(N(CCCl)CCCl)cc1)C(=O)O"),
    ("ketoprofen", "CC(C(=O)O)c1cccc(c1)C(=O)c1ccccc1"),
    ("lapatinib", "CS(=O)(=O)CCNCc1ccc(o1)-c1ccc2ncnc(Nc3ccc(OCc4cccc(F)c4)c(Cl)c3)c2c1"),
    ("theobromine", "Cn1cnc2c1c(=O)[nH]c(=O)n2C"),
    ("hydrocortisone", "CC12CCC(=O)C=C1CCC1C2C(O)CC2(C)C1CCC2(O)C(=O)CO"),
    ("nilotinib", "Cc1cn(-c2cc(NC(=O)c3ccc(C)c(Nc4nccc(-c5cccnc5)n4)c3)cc(c2)C(F)(F)F)cn1"),
    ("diclofenac", "OC(=O)Cc1ccccc1Nc1c(Cl)cccc1Cl"),
    ("flurbiprofen", "CC(C(=O)O)c1ccc(-c2ccccc2)c(F)c1"),
    ("panobinostat", "Cc1[nH]c2ccccc2c1CCNCc1ccc(C=CC(=O)NO)cc1"),
    ("raloxifene", "Oc1ccc(cc1)-c1sc2cc(O)ccc2c1C(=O)c1ccc(OCCN2CCCCC2)cc1"),
    ("mefenamic acid", "Cc1cccc(Nc2ccccc2C(=O)O)c1C"),
    ("dasatinib", "Cc1nc(Nc2ncc(s2)C(=O)Nc2c(C)cccc2Cl)cc(n1)N1CCN(CCO)CC1"),
    ("fluorouracil", "O=c1[nH]cc(F)c(=O)[nH]1"),
    ("methotrexate", "CN(Cc1cnc2nc(N)nc(N)c2n1)c1ccc(cc1)C(=O)NC(CCC(=O)O)C(=O)O"),
    ("celecoxib", "Cc1ccc(cc1)-c1cc(nn1-c1ccc(cc1)S(N)(=O)=O)C(F)(F)F"),
    ("indomethacin", "COc1ccc2n(C(=O)c3ccc(Cl)cc3)c(C)c(CC(=O)O)c2c1"),
    ("sorafenib", "CNC(=O)c1cc(Oc2ccc(NC(=O)Nc3ccc(Cl)c(c3)C(F)(F)F)cc2)ccn1"),
    ("bosutinib", "COc1cc(Nc2c(C#N)cnc3cc(OCCCN4CCN(C)CC4)c(OC)cc23)c(Cl)cc1Cl"),
    ("salicylic acid", "OC(=O)c1ccccc1O"),
)
