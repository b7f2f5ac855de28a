"""qsae_lens.training: the SAELens-registered architectures, trained through SAELens's own
SAETrainer / LanguageModelSAETrainingRunner, checked against ground truth and against SAELens."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

PRECISION_META = {
    "precision": "nf4",
    "quant_type": "nf4",
    "compute_dtype": torch.float32,  # converted to "float32"
    "double_quant": False,
    "bitsandbytes_version": "0.50.0",
    "model_source": "local:SmolLM2-135M-Instruct",
    "weights_sha256": "ab" * 32,
    "device": "cpu",  # not a precision key: must not be copied
}



def _trainer_cfg(n_steps: int, batch: int, lr: float, **kw):
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=n_steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=kw.pop("lr_end", lr),
        logger=LoggingConfig(log_to_wandb=False),
        **kw,
    )


# --------------------------------------------------------------------------- ground truth

D, K_TRUE, D_SAE, TOPK, BATCH = 32, 64, 80, 4, 256


def _true_features() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(K_TRUE, D, generator=g)
    return f / f.norm(dim=-1, keepdim=True)


def _synthetic_batches(features: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """Superposition (64 unit directions in 32 dims), each feature on independently with a
    Zipf(0.5) frequency (3 active per token on average), magnitude ~ U[0.5, 2]."""
    freq = 1.0 / torch.arange(1, K_TRUE + 1, dtype=torch.float32) ** 0.5
    freq = freq / freq.sum() * 3.0
    g = torch.Generator().manual_seed(seed)
    while True:
        active = torch.rand(BATCH, K_TRUE, generator=g) < freq
        magnitude = torch.rand(BATCH, K_TRUE, generator=g) * 1.5 + 0.5
        yield (active * magnitude) @ features


def _train_ground_truth(aux: bool, features: torch.Tensor, n_steps: int = 1500):
    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig
    from qsae_lens.training import UnitNormSAETrainer as SAETrainer

    cfg = OpenAITopKTrainingSAEConfig(
        d_in=D,
        d_sae=D_SAE,
        k=TOPK,
        init_seed=0,
        dead_tokens_threshold=20_000,
        aux_loss_coefficient=1 / 32 if aux else 0.0,
    )
    sae = OpenAITopKTrainingSAE(cfg)
    norm_errors: list[float] = []

    def provider() -> Iterator[torch.Tensor]:
        # Pulled once per step: between pulls the trainer has finished the previous step.
        for i, batch in enumerate(_synthetic_batches(features, seed=100)):
            if i > 0:
                norm_errors.append((sae.W_dec.detach().norm(dim=-1) - 1).abs().max().item())
            yield batch

    SAETrainer(_trainer_cfg(n_steps, BATCH, 3e-3), sae, provider()).fit()
    return sae, norm_errors


def test_topk_aux_k_recovers_ground_truth_and_revives_dead_latents(one_thread):
    from scipy.optimize import linear_sum_assignment

    features = _true_features()
    held_out = torch.cat(list(itertools.islice(_synthetic_batches(features, seed=999), 8)))
    results = {}
    for aux in (True, False):
        sae, norm_errors = _train_ground_truth(aux, features)
        # Independent check: Hungarian matching of true directions to decoder rows (numpy/scipy).
        w = sae.W_dec.detach().numpy().astype(np.float64)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        cos = features.numpy().astype(np.float64) @ w.T  # [K_TRUE, D_SAE]
        rows, cols = linear_sum_assignment(-cos)
        recovered = float((cos[rows, cols] > 0.9).mean())
        with torch.no_grad():
            # Dead = never active on 2048 held-out tokens, counted from the plain encoder.
            pre = (held_out - sae.b_dec) @ sae.W_enc + sae.b_enc
            top = pre.topk(TOPK, dim=-1).indices
            fired = torch.zeros(D_SAE, dtype=torch.bool)
            fired[top[pre.gather(-1, top) > 0]] = True
        results[aux] = (recovered, int((~fired).sum()), max(norm_errors))
    recovered_on, dead_on, norm_err_on = results[True]
    recovered_off, dead_off, norm_err_off = results[False]
    assert recovered_on >= 0.9, results
    assert dead_on < dead_off, results
    assert norm_err_on < 1e-5 and norm_err_off < 1e-5, results


# --------------------------------------------------------------------------- mechanics


def test_sparse_decode_equals_dense_in_value_and_gradient():
    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig

    sae = OpenAITopKTrainingSAE(OpenAITopKTrainingSAEConfig(d_in=24, d_sae=96, k=7, init_seed=5))
    g = torch.Generator().manual_seed(1)
    values = torch.rand(50, 7, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(96, generator=g)[:7] for _ in range(50)])

    sparse = sae.decode_sparse(values, indices)
    grad_w_sparse, grad_v_sparse = torch.autograd.grad(sparse.pow(2).sum(), [sae.W_dec, values])
    dense_acts = torch.zeros(50, 96).scatter(-1, indices, values)
    dense = dense_acts @ sae.W_dec
    grad_w_dense, grad_v_dense = torch.autograd.grad(dense.pow(2).sum(), [sae.W_dec, values])

    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_v_sparse, grad_v_dense, rtol=1e-5, atol=1e-6)
    # both W_dec gradients went through the unit-norm hook: compare them after it
    torch.testing.assert_close(grad_w_sparse, grad_w_dense, rtol=1e-5, atol=1e-6)


def test_decoder_gradient_hook_removes_the_parallel_component():
    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig

    sae = OpenAITopKTrainingSAE(OpenAITopKTrainingSAEConfig(d_in=16, d_sae=32, k=4, init_seed=2))
    x = torch.randn(64, 16)
    (sae(x) - x).pow(2).sum().backward()
    w = sae.W_dec.detach().double()
    g = sae.W_dec.grad.double()
    assert g.abs().max() > 1e-3  # something to project
    # float32 arithmetic: the parallel part left is rounding, relative to the gradient's size
    assert ((g * w).sum(-1).abs() / g.norm(dim=-1)).max() < 1e-5
    # the projection of the raw gradient, recomputed without the hook (encoder output fixed,
    # since only the decoder path reaches W_dec)
    w_free = sae.W_dec.detach().clone().requires_grad_()
    with torch.no_grad():
        z = sae.encode(x)
    (raw,) = torch.autograd.grad((z @ w_free + sae.b_dec.detach() - x).pow(2).sum(), w_free)
    raw = raw.double()
    assert ((raw * w).sum(-1).abs() / raw.norm(dim=-1)).max() > 1e-2  # there was a parallel part
    torch.testing.assert_close(g, raw - (raw * w).sum(-1, keepdim=True) * w, rtol=1e-4, atol=1e-4)

    # a deep copy (tensor hooks are not copied) gets its hooks back at its first training step
    import copy

    from sae_lens.saes.sae import TrainStepInput

    clone = copy.deepcopy(sae)
    step = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )
    clone.training_forward_pass(step).loss.backward()
    gc, wc = clone.W_dec.grad.double(), clone.W_dec.detach().double()
    assert ((gc * wc).sum(-1).abs() / gc.norm(dim=-1)).max() < 1e-5


def test_init_seed_fixes_weights_and_is_recorded():
    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig

    def build(seed):
        return OpenAITopKTrainingSAE(OpenAITopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, init_seed=seed))

    torch.manual_seed(0)
    a = build(7)
    torch.manual_seed(1)  # the global RNG must not matter
    b = build(7)
    c = build(8)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)
    torch.testing.assert_close(a.W_enc, a.W_dec.T)  # encoder = decoder transpose
    torch.testing.assert_close(a.W_dec.norm(dim=-1), torch.ones(16))
    assert a.cfg.metadata.init_seed == 7
    drawn = build(None)
    assert isinstance(drawn.cfg.init_seed, int) and drawn.cfg.metadata.init_seed == drawn.cfg.init_seed


def test_geometric_median_matches_direct_minimisation():
    from scipy.optimize import minimize

    from qsae_lens.training import geometric_median

    g = torch.Generator().manual_seed(3)
    pts = torch.randn(300, 5, generator=g, dtype=torch.float64)
    pts[:10] *= 200  # outliers: the mean moves, the median barely does
    ours = geometric_median(pts).numpy()
    x = pts.numpy()
    ref = minimize(
        lambda m: np.linalg.norm(x - m, axis=1).sum(),
        x.mean(0),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-10, "maxiter": 20000},
    ).x
    assert np.linalg.norm(ours - ref) < 1e-4
    assert np.linalg.norm(x.mean(0) - ref) > 1.0


def test_aux_loss_is_normalised_residual_mse_of_dead_latents():
    from sae_lens.saes.sae import TrainStepInput

    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig

    cfg = OpenAITopKTrainingSAEConfig(
        d_in=12, d_sae=40, k=3, k_aux=5, init_seed=4, dead_tokens_threshold=10, b_dec_init="zeros"
    )
    sae = OpenAITopKTrainingSAE(cfg)
    x = torch.randn(30, 12)

    def step():
        return sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
            )
        )

    assert step().losses["auxiliary_reconstruction_loss"].item() == 0.0  # nobody dead yet: skipped
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.tokens_since_fired.zero_()
        sae.tokens_since_fired[dead] = 10
    out = step()
    # Independent recomputation: dense formulas, Python-side selection.
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        e = x - out.sae_out
        masked = torch.where(dead, pre, torch.full_like(pre, -1e30))
        idx = masked.argsort(dim=-1, descending=True)[:, :5]
        z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).clamp_min(0))
        e_hat = z @ sae.W_dec
        expected = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum() / 32
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], expected, rtol=1e-5, atol=1e-7)


def test_bad_configs_are_rejected_with_clear_errors():
    from qsae_lens.training import OpenAITopKTrainingSAEConfig

    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        OpenAITopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, rescale_acts_by_decoder_norm=True)
    with pytest.raises(ValueError, match="k must be"):
        OpenAITopKTrainingSAEConfig(d_in=8, d_sae=16, k=32)
    with pytest.raises(ValueError, match="b_dec_init"):
        OpenAITopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, b_dec_init="median")
    with pytest.raises(ValueError, match="dead_tokens_threshold"):
        OpenAITopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, dead_tokens_threshold=0)


def test_registration_is_idempotent():
    import importlib

    from sae_lens.registry import get_sae_class, get_sae_training_class

    import qsae_lens.training as training

    training.register_architectures()
    importlib.reload(training)  # a second import of the package must not raise
    assert set(training.ARCHITECTURES) == {"openai_topk", "gated_frozen_aux"}
    for name, cfg_cls in training.ARCHITECTURES.items():
        assert get_sae_training_class(name)[1] is cfg_cls
        assert get_sae_class(name)[1].architecture() == name


# --------------------------------------------------------------------------- resume


def test_sae_trainer_resume_reproduces_uninterrupted_run(tmp_path, one_thread):
    """SAELens's resume path (trainer state + load_weights_from_checkpoint, as the runner does)
    continues an openai_topk run bit-for-bit, dead-latent window and aux loss included."""
    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig
    from qsae_lens.training import UnitNormSAETrainer as SAETrainer

    features = _true_features()
    batches = list(itertools.islice(_synthetic_batches(features, seed=7), 60))

    def cfg(seed):
        return OpenAITopKTrainingSAEConfig(
            d_in=D, d_sae=D_SAE, k=TOPK, init_seed=seed, dead_tokens_threshold=2_000
        )

    tcfg = dict(
        n_checkpoints=1,
        checkpoint_path=str(tmp_path / "ckpt"),
        lr_scheduler_name="cosineannealing",
        lr_end=1e-4,
    )
    full = OpenAITopKTrainingSAE(cfg(0))
    SAETrainer(_trainer_cfg(60, BATCH, 3e-3, **tcfg), full, iter(batches)).fit()
    (ckpt,) = list((tmp_path / "ckpt").iterdir())
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "trainer_state.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert json.loads((ckpt / "cfg.json").read_text())["architecture"] == "openai_topk"

    resumed = OpenAITopKTrainingSAE(cfg(123))  # different init: the weights must come from the checkpoint
    trainer = SAETrainer(
        _trainer_cfg(60, BATCH, 3e-3, **{**tcfg, "checkpoint_path": str(tmp_path / "c2")}), resumed, iter([])
    )
    trainer.load_trainer_state(ckpt)
    resumed.load_weights_from_checkpoint(ckpt)
    done = trainer.n_training_samples // BATCH
    assert 0 < done < 60 and resumed.tokens_since_fired.max() > 0
    trainer.data_provider = iter(batches[done:])
    trainer.fit()
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert (resumed.W_dec.norm(dim=-1) - 1).abs().max() < 1e-5  # hooks re-attached after loading


# --------------------------------------------------------------------------- runner, save, reload


def _tiny_lm():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=64, act_fn="gelu", seed=0
    )
    return HookedTransformer(cfg)


def _runner_cfg(sae_cfg, tmp: Path, **kw):
    from sae_lens import LanguageModelSAERunnerConfig

    from qsae_lens.training import safe_logging_config

    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny-random",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="local",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=16,
        training_tokens=64 * 40,
        train_batch_size_tokens=64,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        lr=1e-3,
        prepend_bos=False,
        seed=0,
        logger=safe_logging_config(),
        n_checkpoints=1,
        checkpoint_path=str(tmp / "ckpt"),
        output_path=str(tmp / "out"),
        **kw,
    )


def test_runner_trains_resumes_and_saves_plain_saelens_checkpoints(tmp_path, monkeypatch, one_thread):
    """Both architectures through LanguageModelSAETrainingRunner unchanged: train with a checkpoint,
    resume from it with resume_from_checkpoint, save SAEs that plain sae_lens (qsae_lens import
    blocked, in a fresh process) loads and runs identically, precision metadata included."""
    import sae_lens.llm_sae_training_runner as runner_mod
    from datasets import Dataset
    from sae_lens import LanguageModelSAETrainingRunner
    from safetensors.torch import load_file, save_file

    from qsae_lens.training import (
        GatedFrozenAuxTrainingSAEConfig,
        OpenAITopKTrainingSAEConfig,
        attach_precision_metadata,
    )

    model = _tiny_lm()
    g = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, 64, (400, 16), generator=g).tolist()})
    configs = {
        "topk": OpenAITopKTrainingSAEConfig(d_in=32, d_sae=64, k=4, init_seed=11, dead_tokens_threshold=512),
        "gated": GatedFrozenAuxTrainingSAEConfig(d_in=32, d_sae=64, l1_coefficient=1e-3, init_seed=12),
    }
    fit_starts: list[tuple[int, dict[str, torch.Tensor]]] = []
    real_fit = runner_mod.SAETrainer.fit

    def spying_fit(self):  # the real fit, recording where it starts
        fit_starts.append((self.n_training_samples, {k: v.clone() for k, v in self.sae.state_dict().items()}))
        return real_fit(self)

    monkeypatch.setattr(runner_mod.SAETrainer, "fit", spying_fit)
    trained = {}
    x = torch.randn(20, 32) * 3
    for inference_arch, sae_cfg in configs.items():
        attach_precision_metadata(sae_cfg, PRECISION_META)
        tmp = tmp_path / inference_arch
        cfg = _runner_cfg(sae_cfg, tmp)
        sae = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset).run()
        trained[inference_arch] = sae
        out = tmp / "out"
        saved = json.loads((out / "cfg.json").read_text())
        assert saved["architecture"] == inference_arch
        assert {"sae_weights.safetensors", "sparsity.safetensors"} <= {p.name for p in out.iterdir()}

        (ckpt,) = list(Path(cfg.checkpoint_path).iterdir())
        resume_cfg = _runner_cfg(sae_cfg, tmp / "resumed", resume_from_checkpoint=str(ckpt))
        LanguageModelSAETrainingRunner(resume_cfg, override_model=model, override_dataset=dataset).run()
        start_samples, start_state = fit_starts[-1]
        saved_state = load_file(ckpt / "sae_weights.safetensors")
        assert start_samples == int(ckpt.name) > 0
        assert saved_state.keys() == start_state.keys()
        assert all(torch.equal(saved_state[k], start_state[k]) for k in saved_state)

        with torch.no_grad():
            z = sae.encode(x)
            save_file({"x": x, "z": z, "x_hat": sae.decode(z)}, str(tmp / "expected.safetensors"))

    script = textwrap.dedent(
        """
        import json, sys
        class Block:  # make qsae_lens unimportable, installed or not
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "qsae_lens":
                    raise ImportError("qsae_lens is blocked in this process")
        sys.meta_path.insert(0, Block())
        import torch
        from safetensors.torch import load_file
        from sae_lens import SAE
        from sae_lens.saes import GatedSAE, TopKSAE
        report = {}
        for arch, cls in (("topk", TopKSAE), ("gated", GatedSAE)):
            root = sys.argv[1] + "/" + arch
            sae = SAE.load_from_disk(root + "/out")
            ref = load_file(root + "/expected.safetensors")
            with torch.no_grad():
                z = sae.encode(ref["x"])
                x_hat = sae.decode(ref["z"])
            report[arch] = {
                "type_ok": type(sae) is cls,
                "encode_diff": (z - ref["z"]).abs().max().item(),
                "decode_diff": (x_hat - ref["x_hat"]).abs().max().item(),
                "metadata": {k: sae.cfg.metadata.get(k) for k in sae.cfg.metadata.keys()},
                "qsae_loaded": any(m.startswith("qsae_lens") for m in sys.modules),
            }
        print(json.dumps(report))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch, r in report.items():
        assert r["type_ok"] and not r["qsae_loaded"], r
        assert r["encode_diff"] == 0.0 and r["decode_diff"] == 0.0, r
        meta = r["metadata"]
        assert meta["precision"] == "nf4" and meta["compute_dtype"] == "float32"
        assert meta["weights_sha256"] == "ab" * 32 and meta["double_quant"] is False
        assert "device" not in meta
        assert meta["init_seed"] == configs[arch].init_seed
        assert meta["training_architecture"] in ("openai_topk", "gated_frozen_aux")


def test_training_checkpoint_reloads_in_saelens_with_qsae_registered(tmp_path):
    from sae_lens import SAE
    from sae_lens.saes import TopKSAE
    from sae_lens.saes.sae import TrainingSAE

    from qsae_lens.training import (
        OpenAITopKTrainingSAE,
        OpenAITopKTrainingSAEConfig,
        attach_precision_metadata,
    )

    sae = OpenAITopKTrainingSAE(OpenAITopKTrainingSAEConfig(d_in=16, d_sae=48, k=5, init_seed=9))
    sae.initialize_b_dec(torch.randn(200, 16) + 2)
    attach_precision_metadata(sae, PRECISION_META)
    sae.save_model(tmp_path / "ck")
    x = torch.randn(10, 16)
    inference = SAE.load_from_disk(tmp_path / "ck")
    training = TrainingSAE.load_from_disk(tmp_path / "ck")
    assert isinstance(inference, TopKSAE) and type(training) is OpenAITopKTrainingSAE
    with torch.no_grad():
        assert torch.equal(inference.encode(x), sae.encode(x))
        assert torch.equal(training.decode(training.encode(x)), sae.decode(sae.encode(x)))
    assert bool(training.b_dec_initialized) and training.cfg.init_seed == 9
    assert training.cfg.metadata.quant_type == "nf4"


def test_attach_precision_metadata_rejects_non_json():
    from qsae_lens.training import OpenAITopKTrainingSAEConfig, attach_precision_metadata

    cfg = OpenAITopKTrainingSAEConfig(d_in=8, d_sae=16, k=2)
    with pytest.raises(TypeError, match="plain JSON"):
        attach_precision_metadata(cfg, {"precision": "int8", "quant_type": object()})
    with pytest.raises(ValueError, match="precision metadata keys"):
        attach_precision_metadata(cfg, {"device": "cpu"})


# --------------------------------------------------------------------------- gated


def _random_gated(seed: int):
    from qsae_lens.training import GatedFrozenAuxTrainingSAE, GatedFrozenAuxTrainingSAEConfig

    sae = GatedFrozenAuxTrainingSAE(
        GatedFrozenAuxTrainingSAEConfig(d_in=12, d_sae=30, init_seed=seed, l1_coefficient=0.5)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make every parameter matter
        for p in (sae.b_gate, sae.b_mag, sae.r_mag, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def test_gated_weight_sharing_frozen_aux_and_inference_match_saelens():
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig, GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = _random_gated(3)
    x = torch.randn(40, 12)
    # weight sharing: the magnitude path is exp(r_mag) ⊙ W_gate, computed here by hand
    torch.testing.assert_close(sae.W_mag, sae.W_enc * torch.exp(sae.r_mag)[None, :])
    with torch.no_grad():
        xc = x - sae.b_dec
        gate = (xc @ sae.W_enc + sae.b_gate) > 0
        mag = torch.relu(xc @ (sae.W_enc * torch.exp(sae.r_mag)) + sae.b_mag)
        torch.testing.assert_close(sae.encode(x), gate * mag)

    step = TrainStepInput(
        sae_in=x, coefficients={"l1": 0.5}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )
    out = sae.training_forward_pass(step)
    aux = out.losses["auxiliary_reconstruction_loss"]
    grads = torch.autograd.grad(aux, [sae.W_dec, sae.W_enc, sae.b_gate], allow_unused=True)
    assert grads[0] is None or not grads[0].any()  # frozen decoder copy: no gradient into W_dec
    assert grads[1].abs().max() > 0 and grads[2].abs().max() > 0  # the gate learns from it
    # SAELens's own Gated, same weights, does push the aux gradient into W_dec (what we fix)
    theirs = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=12, d_sae=30))
    theirs.load_state_dict(sae.state_dict())
    their_aux = theirs.training_forward_pass(step).losses["auxiliary_reconstruction_loss"]
    torch.testing.assert_close(their_aux, aux)  # same value, different gradient
    assert torch.autograd.grad(their_aux, theirs.W_dec)[0].abs().max() > 0

    reference = GatedSAE(GatedSAEConfig(d_in=12, d_sae=30))
    reference.load_state_dict(sae.state_dict())
    with torch.no_grad():
        assert torch.equal(reference.encode(x), sae.encode(x))
        z = sae.encode(x)
        assert torch.equal(reference.decode(z), sae.decode(z))


# --------------------------------------------------------------------------- process state


def test_unit_norm_hook_belongs_to_the_training_optimizer(one_thread):
    """Two SAEs trained in one process: only the openai_topk decoder (trained by its own
    UnitNormSAETrainer) is renormalised after steps; no process-wide optimizer hook exists; an
    unrelated optimizer stepping that same decoder later is not hooked."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from torch.optim import optimizer as optim_mod

    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig, UnitNormSAETrainer

    features = _true_features()
    batches = list(itertools.islice(_synthetic_batches(features, seed=3), 30))
    ours = OpenAITopKTrainingSAE(OpenAITopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=TOPK, init_seed=0))
    UnitNormSAETrainer(_trainer_cfg(30, BATCH, 3e-3), ours, iter(batches)).fit()
    plain = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=TOPK, rescale_acts_by_decoder_norm=False))
    SAETrainer(_trainer_cfg(30, BATCH, 3e-3), plain, iter(batches)).fit()

    assert not optim_mod._global_optimizer_post_hooks and not optim_mod._global_optimizer_pre_hooks
    assert (ours.W_dec.detach().norm(dim=-1) - 1).abs().max() < 1e-5
    assert (plain.W_dec.detach().norm(dim=-1) - 1).abs().max() > 1e-2  # SAELens's own: rows drift freely

    # A user's own optimizer on the trained decoder: a plain SGD step, nothing renormalised after it.
    sgd = torch.optim.SGD([ours.W_dec], lr=1.0)
    ours.W_dec.grad = torch.ones_like(ours.W_dec)  # set directly: no backward, so no gradient hook
    expected = ours.W_dec.detach() - 1.0
    sgd.step()
    torch.testing.assert_close(ours.W_dec.detach(), expected, rtol=0, atol=0)


def test_plain_saetrainer_gets_unit_norm_rows_at_every_forward_and_at_save(tmp_path, one_thread):
    """Under SAELens's SAETrainer (no hook on its optimizer, as inside the runner) the SAE
    renormalises its rows itself: every training forward pass sees unit-norm rows, and the saved
    inference SAE has them."""
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import load_file

    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig

    sae = OpenAITopKTrainingSAE(OpenAITopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=TOPK, init_seed=1))
    seen: list[float] = []
    sae.hook_sae_acts_pre.add_hook(
        lambda act, hook: seen.append((sae.W_dec.detach().norm(dim=-1) - 1).abs().max().item())
    )
    batches = itertools.islice(_synthetic_batches(_true_features(), seed=5), 20)
    SAETrainer(_trainer_cfg(20, BATCH, 3e-3), sae, batches).fit()
    assert len(seen) >= 20 and max(seen) < 1e-5, seen
    sae.save_inference_model(str(tmp_path))
    w = load_file(str(tmp_path / "sae_weights.safetensors"))["W_dec"]
    assert (w.norm(dim=-1) - 1).abs().max() < 1e-5
    assert torch.equal(w, sae.W_dec.detach())


# --------------------------------------------------------------------------- logging


def test_safe_logging_config_is_off_unless_asked_even_with_credentials(tmp_path, monkeypatch):
    # the full wandb behaviour (offline runs, no key in outputs) is in tests/test_wandb.py
    from qsae_lens.training import safe_logging_config

    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password not-a-real-key\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    before = dict(os.environ)
    assert safe_logging_config().log_to_wandb is False
    cfg = safe_logging_config(log_to_wandb=True, wandb_project="qsae")
    assert cfg.log_to_wandb is True and cfg.wandb_project == "qsae"
    assert dict(os.environ) == before
