"""The LOSO benchmark's arms and the predictors it scores (one list each; engine/loso.py runs them,
engine/loso_table.py orders its tables by them)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

#: Each arm's config overrides (dotted keys) on top of the benchmark's recipe.
ARMS: dict[str, dict[str, Any]] = {
    "ridge": {},
    "untrained": {},  # the config's architecture with random weights: no training step (save_untrained)
    "untrained-colour": {"model.vision.colour_features": True},  # ... with the probe's colour statistics
    "untrained-colour-views": {"model.vision.colour_features": True, "model.vision.test_views": 8},
    "comtip": {},
    "comtip-nomfm": {"model.w_mfm": 0.0},
    "comtip-nopaat": {"model.w_paat": 0.0},
    "comtip-nomfm-nopaat": {"model.w_mfm": 0.0, "model.w_paat": 0.0},
    "comtip-nounlab": {"data.unlabelled": False},
    "names": {"model.text.mode": "names"},
    "names-nomfm": {"model.text.mode": "names", "model.w_mfm": 0.0},
    "values": {"model.text.mode": "values"},
    "values-nomfm": {"model.text.mode": "values", "model.w_mfm": 0.0},
    "values-nopaat": {"model.text.mode": "values", "model.w_paat": 0.0},
    "values-nomfm-nopaat": {"model.text.mode": "values", "model.w_mfm": 0.0, "model.w_paat": 0.0},
    # zero-shot levers: the spot's depth as its own token; undetected genes at 0 in the sentences,
    # more one-gene sentences (these two did not help: docs/results.md)
    "comtip-lib": {"model.w_mfm": 0.0, "model.text.library_token": True},
    "comtip-rank": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank"},
    "comtip-rank-lib": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.text.library_token": True},
    "comtip-rank-colour": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                           "model.vision.colour_features": True},  # derived from comtip-rank's folds
    # the whole expression vector as a second text view beside the sentences (model.w_profile)
    "comtip-profile": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0},
    # ... with the colour-texture statistics of the input patch beside the probe's ViT features (the
    # flag changes no training step: scripts/derive_fold_arm.py derives its folds from comtip-profile's)
    "comtip-profile-colour": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                              "model.vision.colour_features": True},
    # ... with the profile term at 0.3 (less pull towards the training patients' expression)
    "comtip-profile-w03": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 0.3,
                           "model.vision.colour_features": True},
    # ... with three times the stain and colour jitter (against the patient's stain, the cross-patient fold)
    "comtip-profile-stain": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                             "data.hed_sigma": 0.15, "data.hed_bias": 0.05, "data.brightness": 0.3,
                             "data.contrast": 0.3, "data.saturation": 0.3},
    # gene tokens that do not attend to each other (DeepSets: a sentence is the mean of per-gene
    # terms, so zero-shot's one-gene sentences read the terms training sentences are made of), and
    # sentences of up to 256 genes (their cost is now linear in length); probe with colour statistics
    "comtip-tokenwise": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.text.token_mixing": False,
                         "model.text.pool": "mean", "model.text.max_genes": 256, "model.vision.colour_features": True},
    # the sentence also read as a dense panel vector by an MLP beside the set transformer (the
    # text-encoder capacity diagnostic: docs/results.md, round of 2026-12-06), with longer sentences
    "comtip-sparse": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.text.sparse_pathway": True,
                      "model.text.max_genes": 128, "model.vision.colour_features": True},
    "comtip-sparse-profile": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.text.sparse_pathway": True,
                              "model.text.max_genes": 128, "model.w_profile": 1.0, "model.vision.colour_features": True},
    # the zero-shot readout trained directly (model.w_grid: each image against its genes' value grids)
    # test-time views change no training step: derived from the parents' folds (scripts/derive_fold_arm.py)
    "comtip-rank-colour-views": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                 "model.vision.colour_features": True, "model.vision.test_views": 8},
    "comtip-profile-colour-views": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                                    "model.vision.colour_features": True, "model.vision.test_views": 8},
    # the probe's full-resolution morphology prior (vision.morphology_px: patches read at 224 px, the
    # ViT still at img_size; colour deconvolution and nuclei, model/morphology.py): a reading, derived
    # from the parents' folds (scripts/derive_fold_arm.py)
    "untrained-colour-morph": {"model.vision.colour_features": True, "model.vision.morphology_px": 224},
    "comtip-rank-colour-morph": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                 "model.vision.colour_features": True, "model.vision.morphology_px": 224},
    # ... read at 112 px instead (1.38 um/px: a quarter of the pixels, for speed)
    "untrained-colour-morph112": {"model.vision.colour_features": True, "model.vision.morphology_px": 112},
    "comtip-rank-colour-morph112": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                    "model.vision.colour_features": True, "model.vision.morphology_px": 112},
    # ... its two views drawn with one gene set per view for the whole batch (values alone match them)
    "comtip-textssl-shared": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_text_ssl": 1.0,
                              "data.expression_only_sampler": "shared",
                              "model.vision.colour_features": True, "model.vision.morphology_px": 112},
    # the shipped recipes' own architectures with random weights: the untrained control of the probe
    # AND of zero-shot (its readout, value ranges and calibration, set from the training spots)
    "untrained-rank-colour-morph112": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                       "model.vision.colour_features": True, "model.vision.morphology_px": 112},
    "untrained-profile-colour": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                                 "model.vision.colour_features": True},
    # the probe reading the image embedding too (vision.probe_input, a reading: derived from the
    # parents' folds by scripts/derive_fold_arm.py): beside the her2st recipe's features, instead of
    # the mouse-brain recipe's; and the same readings of their untrained controls
    "comtip-rank-colour-morph112-emb": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                        "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                        "model.vision.probe_input": "features+embedding"},
    "untrained-rank-colour-morph112-emb": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                           "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                           "model.vision.probe_input": "features+embedding"},
    "comtip-profile-colour-embonly": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                                      "model.vision.colour_features": True, "model.vision.probe_input": "embedding"},
    "untrained-profile-colour-embonly": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                         "model.w_profile": 1.0, "model.vision.colour_features": True,
                                         "model.vision.probe_input": "embedding"},
    "comtip-profile-colour-morph": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                                    "model.vision.colour_features": True, "model.vision.morphology_px": 224},
    "comtip-grid": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_grid": 1.0,
                    "model.vision.colour_features": True},
    # the shipped her2st recipe plus the expression-only term (model/text_ssl.py): gene sentences also
    # trained on spots without images, those of data.expression_only (training/configs/loso-textssl.yaml
    # names her2st_counts_only) and the training spots
    "comtip-textssl": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_text_ssl": 1.0,
                       "model.vision.colour_features": True, "model.vision.morphology_px": 112},
    # the her2st recipe with each batch drawn from one section (data.batches: per_section): InfoNCE's
    # negatives then share the positive's stain and patient, as held-out PCC compares spots of one section
    "comtip-rank-colour-morph112-secbatch": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                             "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                             "data.batches": "per_section"},
    # ... with batches of 128 spots (twice the negatives per InfoNCE step, the same epochs and spot visits)
    "comtip-rank-colour-morph112-b128": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                         "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                         "training.batch_size": 128},
    # ... plus image self-distillation against an EMA teacher (model/image_ssl.py): two views of each
    # spot patch and of the unlabelled tissue patches between and around the spots (data.unlabelled)
    "comtip-rank-colour-morph112-issl": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                         "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                         "model.w_image_ssl": 1.0},
    # ... with twice its weight and twice the unlabelled tissue patches per step (the term's dose)
    "comtip-rank-colour-morph112-issl-alltissue": "comtip-rank-colour-morph112-issl whose unlabelled tissue patches also come from the two visium_mouse_brain slides (data.tissue_only)",
    "comtip-rank-colour-morph112-lr2e3": "comtip-rank-colour-morph112 at twice the learning rate (training.lr 2e-3)",
    "comtip-rank-colour-morph112-issl2": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                          "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                          "model.w_image_ssl": 2.0, "data.unlabelled_batch": 64},
    # ... its unlabelled tissue also from the two Visium mouse-brain slides (data.tissue_only; paths are
    # relative to the repository root, like training/configs/loso-textssl.yaml): the her2st benchmark's arm
    # (benchmark-loso refuses it on visium_mouse_brain itself, whose held-out section it would read)
    "comtip-rank-colour-morph112-issl-alltissue": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                                   "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                                   "model.w_image_ssl": 1.0,
                                                   "data.tissue_only": ["../shared/data/visium_mouse_brain"]},
    # ... at twice the learning rate (2e-3; the same warmup, cosine schedule and 20 epochs)
    "comtip-rank-colour-morph112-lr2e3": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank",
                                          "model.vision.colour_features": True, "model.vision.morphology_px": 112,
                                          "training.lr": 2.0e-3},
    "comtip-grid-profile": {"model.w_mfm": 0.0, "model.text.value_transform": "spot_rank", "model.w_profile": 1.0,
                            "model.w_grid": 1.0, "model.vision.colour_features": True},
    "comtip-zs-uniform": {"model.w_mfm": 0.0, "data.expressed_weight": 1.0, "model.text.p_single": 0.3},
    "comtip-zs-w3": {"model.w_mfm": 0.0, "data.expressed_weight": 3.0, "model.text.p_single": 0.3},
}
ARM_TEXT = {
    "ridge": "colour-texture features + ridge (floor)",
    "untrained": "the recipe's architecture with random weights, same probe rule (control)",
    "untrained-colour": "the untrained control, its probe also reading the patch's colour-texture statistics",
    "untrained-colour-views": "untrained-colour, each patch read as the mean over its 8 flips and quarter turns",
    "comtip": "CoMTIP: names+values, MFM, PAAT",
    "comtip-nomfm": "names+values, PAAT, no MFM",
    "comtip-nopaat": "names+values, MFM, no PAAT",
    "comtip-nomfm-nopaat": "names+values, no MFM, no PAAT",
    "comtip-nounlab": "CoMTIP, MFM without unlabelled tissue patches",
    "names": "names only (OmiCLIP-style), MFM",
    "names-nomfm": "names only, no MFM",
    "values": "values only (BLEEP-style), MFM, PAAT",
    "values-nomfm": "values only, PAAT, no MFM",
    "values-nopaat": "values only, MFM, no PAAT",
    "values-nomfm-nopaat": "values only, no MFM, no PAAT",
    "comtip-lib": "names+values, no MFM, library-size token in every sentence",
    "comtip-rank": "names+values, no MFM, values = within-spot ranks",
    "comtip-rank-lib": "names+values, no MFM, within-spot ranks and the library-size token",
    "comtip-rank-colour": "comtip-rank, the probe also reading the patch's colour-texture statistics",
    "comtip-profile": "comtip-rank plus the profile term (the whole expression vector through the text branch's MLP)",
    "comtip-profile-colour": "comtip-profile, the probe also reading the patch's colour-texture statistics",
    "comtip-profile-w03": "comtip-profile-colour with the profile term at weight 0.3",
    "comtip-profile-stain": "comtip-profile with three times the stain (HED) and colour jitter",
    "comtip-tokenwise": "comtip-rank-colour with gene tokens that do not attend to each other (mean of per-gene terms) and sentences of up to 256 genes",
    "comtip-sparse": "comtip-rank-colour with the sparse pathway (the sentence as a dense panel vector through an MLP) and sentences of up to 128 genes",
    "comtip-sparse-profile": "comtip-sparse with the profile term (comtip-profile-colour with the sparse pathway and sentences of up to 128 genes)",
    "comtip-rank-colour-views": "comtip-rank-colour, each patch read as the mean over its 8 flips and quarter turns (test-time views)",
    "comtip-profile-colour-views": "comtip-profile-colour, each patch read as the mean over its 8 flips and quarter turns",
    "untrained-colour-morph": "untrained-colour, its probe also reading the full-resolution morphology statistics (224 px: colour deconvolution, nuclei)",
    "comtip-rank-colour-morph": "comtip-rank-colour, its probe also reading the full-resolution morphology statistics (224 px)",
    "untrained-colour-morph112": "untrained-colour-morph with the patch read at 112 px (1.38 um/px)",
    "comtip-rank-colour-morph112": "comtip-rank-colour-morph with the patch read at 112 px (1.38 um/px)",
    "untrained-rank-colour-morph112": "comtip-rank-colour-morph112 (the her2st checkpoint's recipe) with random weights: the probe's and zero-shot's control",
    "untrained-profile-colour": "comtip-profile-colour (the mouse-brain checkpoint's recipe) with random weights: the probe's and zero-shot's control",
    "comtip-rank-colour-morph112-emb": "comtip-rank-colour-morph112, its probe also reading the image embedding (vision.probe_input features+embedding)",
    "untrained-rank-colour-morph112-emb": "untrained-rank-colour-morph112, its probe also reading the (random) image embedding",
    "comtip-profile-colour-embonly": "comtip-profile-colour, its probe reading the image embedding instead of the features (vision.probe_input embedding)",
    "untrained-profile-colour-embonly": "untrained-profile-colour, its probe reading the (random) image embedding instead of the features",
    "comtip-profile-colour-morph": "comtip-profile-colour, its probe also reading the full-resolution morphology statistics (224 px)",
    "comtip-grid": "comtip-rank-colour plus the value-grid term (the zero-shot readout trained: each image against its genes' value grids)",
    "comtip-rank-colour-morph112-secbatch": "comtip-rank-colour-morph112 with each training batch drawn from one section (data.batches per_section)",
    "comtip-rank-colour-morph112-b128": "comtip-rank-colour-morph112 with training batches of 128 spots (twice the InfoNCE negatives, same epochs)",
    "comtip-rank-colour-morph112-issl": "comtip-rank-colour-morph112 plus image self-distillation (BYOL, EMA teacher) on two views of the spot and unlabelled tissue patches (model.w_image_ssl 1)",
    "comtip-rank-colour-morph112-issl-alltissue": "comtip-rank-colour-morph112-issl whose unlabelled tissue patches also come from the two visium_mouse_brain slides (data.tissue_only)",
    "comtip-rank-colour-morph112-lr2e3": "comtip-rank-colour-morph112 at twice the learning rate (training.lr 2e-3)",
    "comtip-rank-colour-morph112-issl2": "comtip-rank-colour-morph112-issl with the term at weight 2 and 64 unlabelled tissue patches per step instead of 32",
    "comtip-grid-profile": "comtip-profile-colour plus the value-grid term",
    "comtip-textssl-shared": "comtip-textssl with the two views drawn from one gene set per view for the whole batch (only values tell the spots apart)",
    "comtip-textssl": "comtip-rank-colour-morph112 plus the expression-only term (two gene sentences of one spot, with or without its image, find each other)",
    "comtip-zs-uniform": "names+values, no MFM, genes drawn uniformly (zeros in sentences), 30 % one-gene sentences",
    "comtip-zs-w3": "names+values, no MFM, expressed genes 3x as likely, 30 % one-gene sentences",
}
#: The floor arm's predictors: its colour-texture features alone, and in the probe's spatial context.
FLOOR_MODES = ("ridge", "ridge-ctx")
#: Every predictor the benchmark scores for a learned arm: the user's predictors (constants.PREDICT_MODES)
#: and three benchmark-only variants, ``probe-raw`` (ridge on the spot's own pooled features, no
#: context), ``floor+probe`` (the probe rule on the floor's and the encoder's features side by side)
#: and ``zero-shot-raw`` (zero-shot on the spot's own embedding, no neighbourhood; what ``zero-shot``
#: was before 2026-12-07).
LEARNED_MODES = ("retrieval", "probe-raw", "probe", "floor+probe", "zero-shot-raw", "zero-shot")
#: Predictors in table order.
MODE_ORDER = FLOOR_MODES + LEARNED_MODES


def is_untrained(arm: str) -> bool:
    """An arm without a training step (random weights; see engine/loso.py save_untrained)."""
    return arm == "untrained" or arm.startswith("untrained-")


def arm_overrides(arm: str) -> dict[str, Any]:
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}", hint=f"choose from {', '.join(ARMS)}")
    return dict(ARMS[arm])


__all__ = ["ARMS", "ARM_TEXT", "is_untrained", "FLOOR_MODES", "LEARNED_MODES", "MODE_ORDER", "arm_overrides"]
