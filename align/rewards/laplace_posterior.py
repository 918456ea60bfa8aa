"""Bayesian reward model by a post-hoc Laplace approximation over LoRA weights (Laplace-LoRA).

Yang et al., "Bayesian Reward Models for LLM Alignment" (arXiv 2402.13210): a reward model trained
with the Bradley-Terry loss is over-confident off its training distribution, and best-of-n against
it is exploited (reward hacking). They fit a Laplace approximation to the posterior of the LoRA
weights at the trained (MAP) point, theta ~ N(theta_MAP, Sigma), Sigma^-1 = GGN of the pair
likelihood + prior precision, and score a single sequence x with the linearised (GLM) predictive

    r(x) ~ N(mu(x), sigma^2(x)),  mu(x) = f(x; theta_MAP),  sigma^2(x) = J(x) Sigma J(x)^T,

J(x) = d f(x; theta) / d theta at theta_MAP. Best-of-n then ranks candidates by mu - k * sigma, so a
candidate the reward model knows little about is not picked on an inflated point estimate.

laplace-torch does the inference: `likelihood="reward_modeling"` fits the Bradley-Terry likelihood
as 2-class cross-entropy over [r_chosen, r_rejected] (the curvature is that pair GGN), predicts one
sequence's reward as regression, the KFAC / diagonal curvature comes from its default Curvlinops
backend (the ASDL and BackPACK backends break on peft's frozen parameters and ModulesToSaveWrapper),
and the prior precision is tuned by its marginal likelihood. "all" weights means every parameter with
requires_grad, i.e. the LoRA factors and the reward head; the frozen backbone is a constant.

Written here, because laplace-torch does not do it:
  * `RewardPairModel`, one module that laplace-torch calls as model(X): (B, 2, L) pairs give (B, 2)
    rewards for the fit, (B, L) sequences give (B, 1) for prediction. Token ids and the attention mask
    travel in ONE long tensor, padding written as -1: the mask is the sequence's real extent, never
    `ids == pad` (wrong when pad == eos, as for GPT-2, and a sequence contains eos).
  * batching, padding (right, the side the project's reward models train and score with) and
    chunked prediction: laplace-torch's Jacobians come from jacrev over the whole batch, cost and
    memory growing with the batch squared (256 sequences in one call: 65 s / 16 GB; chunks of 32: a
    few seconds, < 1 GB).
  * save / load: laplace-torch's state_dict holds tensors in nested lists and strings, which only
    pickle would store; here every tensor goes to safetensors and the rest to JSON, next to the base
    model, tokenizer and peft adapter, so a directory is self-contained and loads without pickle.

No Ray here: this is pure torch + transformers + peft + laplace-torch.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

PAD = -1  # the padding marker inside a packed id tensor (token ids are >= 0)
HESSIAN_STRUCTURES = ("kron", "diag")
PRIOR_OPTIMIZATIONS = ("marglik", "none")
FORMAT = "sweetspot-laplace-reward/1"
META_FILE = "laplace_reward.json"
POSTERIOR_FILE = "posterior.safetensors"
BASE_DIR = "base"  # base model (frozen weights, config) + tokenizer
ADAPTER_DIR = "adapter"  # peft adapter: LoRA factors + reward head


def pack(seqs: list[list[int]], width: int | None = None) -> torch.Tensor:
    """(len(seqs), width) long tensor of right-padded ids, padding = PAD (-1)."""
    width = max(len(s) for s in seqs) if width is None else width
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class RewardPairModel(nn.Module):
    """The reward model as laplace-torch calls it: model(X) on packed ids (see `pack`).

    X (B, 2, L): preference pairs, returns (B, 2) rewards [r_chosen, r_rejected] (the fit's logits);
    X (B, L): single sequences, returns (B, 1) rewards (prediction). PAD positions get attention
    mask 0 and the pad token id, exactly what `align.data.pairs.pad_right` gives the classifier, so rewards
    equal the classifier's on each sequence alone. (GPT-2 style heads still pool at the last token
    that is not the pad id, inside the HF model: with pad == eos a trailing eos is not the scored
    token, as in every other use of these classifiers in the project.)"""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected packed ids of shape (B, L) or (B, 2, L), got {tuple(x.shape)}")
        device = next(self.model.parameters()).device
        flat = x.reshape(-1, x.shape[-1]).to(device)
        real = flat != PAD
        ids = torch.where(real, flat, torch.full_like(flat, self.pad_id))
        r = self.model(input_ids=ids, attention_mask=real.long()).logits[:, 0]
        return r.reshape(x.shape[0], 2) if x.dim() == 3 else r.reshape(-1, 1)


class _Pairs(torch.utils.data.Dataset):
    """Preference pairs for laplace-torch's fit: item i is (chosen ids, rejected ids); `_collate_pairs`
    packs a batch. `len()` is the N laplace-torch scales the curvature by."""

    def __init__(self, chosen: list[list[int]], rejected: list[list[int]]):
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int):
        return self.chosen[i], self.rejected[i]


def _collate_pairs(items):
    """Pad one batch to its own longest sequence: (B, 2, L) packed ids, (B,) targets, all 0."""
    width = max(max(len(c), len(r)) for c, r in items)
    x = torch.stack([pack([c, r], width) for c, r in items])
    return x, torch.zeros(len(items), dtype=torch.long)


def _check_seqs(name: str, seqs) -> None:
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"{name}[{i}] is empty")
        if min(s) < 0:
            raise ValueError(f"{name}[{i}] has a negative token id")


def _pad_id(model: nn.Module) -> int:
    """The id padding is written as: the config's pad_token_id, which is also what GPT-2 / Llama style
    classifiers pool by (they score the last token that is not it; align.engine.models.build_model_for sets
    it to the tokenizer's pad id). Without it such a model would score a pad position."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise ValueError("model.config.pad_token_id is not set: set it to the tokenizer's pad id "
                         "(the eos id when the tokenizer has no pad token)")
    return int(pad)


def _make_laplace(wrapper: RewardPairModel, hessian_structure: str, prior_precision: float = 1.0):
    from laplace import Laplace

    return Laplace(wrapper, "reward_modeling", subset_of_weights="all", hessian_structure=hessian_structure,
                   prior_precision=prior_precision)


def _has_unfused_gelu(model: nn.Module) -> bool:
    """Whether the model computes GELU in the Python modules that align.engine.models.fuse_gelu swaps out.
    Saved, so that load fuses exactly when the saved model was fused (fusing moves a reward ~1e-7)."""
    from transformers.activations import FastGELUActivation, NewGELUActivation

    return any(type(m) in (NewGELUActivation, FastGELUActivation) for m in model.modules())


def _base_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of a peft-wrapped model: LoRA factors and trained copies of
    modules_to_save dropped (they are in the adapter), `base_layer.` / `original_module.` unwrapped.
    The frozen weights are saved as they are in memory: a head or pooler that from_pretrained
    initialised at random is kept, not re-drawn at load."""
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


class LaplaceReward:
    """A LoRA reward model with a Laplace posterior: `predict(seqs)` -> (mean, var) of each reward.

    Build with `LaplaceReward.fit` (at the trained weights) or `LaplaceReward.load`. The peft model is
    kept in eval mode; `mean` is the model's reward at the MAP weights, `var` = J Sigma J^T."""

    def __init__(self, la, wrapper: RewardPairModel, tokenizer, hessian_structure: str):
        self.la = la  # the laplace-torch posterior (KronLaplace / DiagLaplace) over wrapper's trainable weights
        self.wrapper = wrapper
        self.tokenizer = tokenizer
        self.hessian_structure = hessian_structure

    @property
    def model(self) -> nn.Module:
        """The peft sequence classifier."""
        return self.wrapper.model

    @property
    def device(self) -> torch.device:
        return next(self.wrapper.parameters()).device

    @property
    def prior_precision(self) -> float | torch.Tensor:
        """The (tuned) prior precision: a float when scalar, else a per-layer / per-parameter tensor."""
        p = self.la.prior_precision
        return float(p.item()) if p.numel() == 1 else p.detach().clone()

    @property
    def num_pairs(self) -> int:
        """How many preference pairs the posterior was fit on."""
        return int(self.la.n_data)

    @classmethod
    def fit(cls, peft_model: nn.Module, tokenizer, chosen: list[list[int]], rejected: list[list[int]],
            batch_size: int = 16, hessian_structure: str = "kron", prior_optimization: str = "marglik",
            prior_precision: float = 1.0) -> "LaplaceReward":
        """Fit the Laplace posterior of `peft_model`'s trainable weights (LoRA + head) at their current
        values on preference pairs (chosen[i] preferred over rejected[i]; token ids, prompt included).

        hessian_structure: "kron" (KFAC) or "diag". prior_optimization: "marglik" (laplace-torch's
        marginal-likelihood tuning of a scalar prior precision, started at `prior_precision`) or "none"
        (keep `prior_precision`). batch_size: pairs per curvature batch. KFAC is one forward and
        backward per batch; diag takes Jacobians of the whole batch (cost ~ batch_size^2 per batch),
        so for diag small batches (2-4) are faster."""
        if hessian_structure not in HESSIAN_STRUCTURES:
            raise ValueError(f"hessian_structure must be one of {HESSIAN_STRUCTURES}, got {hessian_structure!r}")
        if prior_optimization is None:
            prior_optimization = "none"
        if prior_optimization not in PRIOR_OPTIMIZATIONS:
            raise ValueError(f"prior_optimization must be one of {PRIOR_OPTIMIZATIONS}, got {prior_optimization!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(prior_precision, (int, float)) and prior_precision > 0):
            raise ValueError(f"prior_precision must be a positive number, got {prior_precision!r}")
        if len(chosen) != len(rejected):
            raise ValueError(f"chosen and rejected differ in length ({len(chosen)} vs {len(rejected)})")
        if not chosen:
            raise ValueError("chosen and rejected are empty: no pairs to fit on")
        _check_seqs("chosen", chosen)
        _check_seqs("rejected", rejected)
        if not any(p.requires_grad for p in peft_model.parameters()):
            raise ValueError("the model has no trainable parameters (LoRA + head) to put a posterior on")

        wrapper = RewardPairModel(peft_model, _pad_id(peft_model)).eval()
        la = _make_laplace(wrapper, hessian_structure, float(prior_precision))
        # Batches of similar lengths: KFAC's input factors average over every position of a batch,
        # padding included, so less padding is a closer fit (and faster). The sum is order-free.
        order = sorted(range(len(chosen)), key=lambda i: max(len(chosen[i]), len(rejected[i])))
        data = _Pairs([list(chosen[i]) for i in order], [list(rejected[i]) for i in order])
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate_pairs)
        la.fit(loader)
        if prior_optimization == "marglik":
            with warnings.catch_warnings():  # a note on classification's link_approx: predictions here are regression
                warnings.filterwarnings("ignore", message="By default `link_approx`")
                la.optimize_prior_precision(pred_type="glm", method="marglik", init_prior_prec=float(prior_precision))
        return cls(la, wrapper, tokenizer, hessian_structure)

    def predict(self, seqs: list[list[int]], chunk_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var), float64 tensors [N]: the GLM predictive of each sequence's reward (token ids).

        Computed `chunk_size` sequences at a time, chunks grouped by length to pad little; results do
        not depend on chunking or padding (to float rounding). laplace-torch's Jacobian of a chunk costs
        ~chunk_size^2: on CPU chunks of 4-8 are fastest (MiniLM, 64 sequences: ~2 s at 4-8, ~6 s at 32)."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        n = len(seqs)
        mean = torch.zeros(n, dtype=torch.float64)
        var = torch.zeros(n, dtype=torch.float64)
        if n == 0:
            return mean, var
        _check_seqs("seqs", seqs)
        self.wrapper.eval()
        order = sorted(range(n), key=lambda i: len(seqs[i]))
        with torch.no_grad():  # laplace-torch enables grad itself for its Jacobians
            for start in range(0, n, chunk_size):
                rows = order[start : start + chunk_size]
                x = pack([list(seqs[i]) for i in rows]).to(self.device)
                f_mu, f_var = self.la(x, pred_type="glm")
                idx = torch.tensor(rows)
                mean[idx] = f_mu.reshape(-1).double().cpu()
                var[idx] = f_var.reshape(-1).double().cpu()
        return mean, var

    def _check_weights_at_mean(self, what: str) -> None:
        """The GLM predictive linearises at the model's current weights; the posterior was fit at
        la.mean. Training the model further after fit makes the posterior stale."""
        from torch.nn.utils import parameters_to_vector

        if not torch.equal(parameters_to_vector(self.la.params).detach(), self.la.mean.detach()):
            raise ValueError(f"{what}: the model's trainable weights are not the ones the posterior was fit at")

    # ---- serialization -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write a self-contained directory (no pickle; loads on another machine and path):

            laplace_reward.json      format, hessian structure, number of pairs, trainable parameter
                                     names and shapes, pad id, dtype, the file list
            posterior.safetensors    mean (MAP vector), prior_precision, prior_mean, sigma_noise, loss,
                                     and H (diag: one vector) or H.{i}.{j} (kron: the Kronecker factors)
            base/                    the base model (config.json, model.safetensors) and tokenizer
            adapter/                 the peft adapter (adapter_config.json, adapter_model.safetensors)
        """
        from importlib.metadata import version

        from safetensors.torch import save_file

        self._check_weights_at_mean("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = self.model.get_base_model()
        base.save_pretrained(directory / BASE_DIR, state_dict=_base_state_dict(base))
        self.tokenizer.save_pretrained(directory / BASE_DIR)
        self.model.save_pretrained(directory / ADAPTER_DIR)

        state = self.la.state_dict()
        tensors = {"mean": state["mean"], "prior_precision": state["prior_precision"],
                   "prior_mean": torch.as_tensor(state["prior_mean"]).reshape(-1),
                   "sigma_noise": torch.as_tensor(state["sigma_noise"]).reshape(-1),
                   "loss": torch.as_tensor(state["loss"]).reshape(-1)}
        if self.hessian_structure == "kron":
            kron_layout = [len(block) for block in state["H"]]
            for i, block in enumerate(state["H"]):
                for j, factor in enumerate(block):
                    tensors[f"H.{i}.{j}"] = factor
        else:
            kron_layout = None
            tensors["H"] = state["H"]
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / POSTERIOR_FILE))

        files = sorted(str(p.relative_to(directory)) for sub in (BASE_DIR, ADAPTER_DIR)
                       for p in (directory / sub).rglob("*") if p.is_file() and p.name != "README.md")
        meta = {
            "format": FORMAT,
            "laplace_torch": version("laplace-torch"),
            "likelihood": state["likelihood"],
            "laplace_class": state["cls_name"],
            "hessian_structure": self.hessian_structure,
            "num_pairs": int(state["n_data"]),
            "n_outputs": int(state["n_outputs"]),
            "temperature": float(state["temperature"]),
            "enable_backprop": bool(state["enable_backprop"]),
            "kron_layout": kron_layout,
            "pad_id": self.wrapper.pad_id,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
            "fuse_gelu": not _has_unfused_gelu(self.model),
            "params": [[name, list(p.shape)] for name, p in self.model.named_parameters() if p.requires_grad],
            "files": sorted([POSTERIOR_FILE, *files]),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))  # last: a directory without it is incomplete
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "LaplaceReward":
        """Rebuild a saved LaplaceReward on `device`; predict gives the numbers it gave when saved.
        A missing file raises FileNotFoundError naming it."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise FileNotFoundError(f"{directory / META_FILE} is missing: not a saved LaplaceReward")
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory / META_FILE}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
        for rel in meta["files"]:
            if not (directory / rel).is_file():
                raise FileNotFoundError(f"{directory / rel} is missing from the saved LaplaceReward")

        tokenizer = AutoTokenizer.from_pretrained(str(directory / BASE_DIR))
        kwargs = {"dtype": getattr(torch, meta["dtype"])}
        if meta.get("attn_implementation"):
            kwargs["attn_implementation"] = meta["attn_implementation"]
        base = AutoModelForSequenceClassification.from_pretrained(str(directory / BASE_DIR), **kwargs)
        if meta["fuse_gelu"]:
            from align.engine.models import fuse_gelu

            fuse_gelu(base)
        model = PeftModel.from_pretrained(base, str(directory / ADAPTER_DIR), is_trainable=True)
        model = model.to(device).eval()
        trainable = [[name, list(p.shape)] for name, p in model.named_parameters() if p.requires_grad]
        if trainable != meta["params"]:
            raise ValueError(f"{directory}: the rebuilt model's trainable parameters differ from the saved posterior's")

        wrapper = RewardPairModel(model, meta["pad_id"]).eval()
        la = _make_laplace(wrapper, meta["hessian_structure"])
        t = load_file(str(directory / POSTERIOR_FILE), device=str(la._device))
        if meta["hessian_structure"] == "kron":
            H = [[t[f"H.{i}.{j}"] for j in range(n)] for i, n in enumerate(meta["kron_layout"])]
        else:
            H = t["H"]
        la.load_state_dict({
            "mean": t["mean"], "H": H, "loss": t["loss"][0], "prior_mean": t["prior_mean"],
            "prior_precision": t["prior_precision"], "sigma_noise": t["sigma_noise"],
            "n_data": meta["num_pairs"], "n_outputs": meta["n_outputs"], "likelihood": meta["likelihood"],
            "temperature": meta["temperature"], "enable_backprop": meta["enable_backprop"],
            "cls_name": meta["laplace_class"],
        })
        loaded = cls(la, wrapper, tokenizer, meta["hessian_structure"])
        loaded._check_weights_at_mean(f"load {directory}")
        return loaded
