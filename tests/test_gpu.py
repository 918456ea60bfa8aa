"""The CUDA paths, skipped where there is no GPU: sampling, scoring, and a DeepSpeed training step
(NCCL, bf16) on one GPU, each checked against the same computation on the CPU."""
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_sampling_on_cuda_matches_the_process_log_probs(tiny_lm_dir):
    from actors.generator import Generator
    from align.engine.models import encode_prompts
    from align.engine.sampling import continuation_logprobs

    gen = Generator(str(tiny_lm_dir), device="cuda", dtype="float32")
    assert gen.device.type == "cuda"
    out = gen.sample(["the movie was", "a good film"], n=4, max_new_tokens=12, min_new_tokens=4, temperature=0.8, seed=0)
    cpu = Generator(str(tiny_lm_dir), device="cpu")
    for s in out["samples"]:
        ids, mask = encode_prompts(cpu.tokenizer, [s.prompt])
        for c, lp in zip(s.completion_ids, s.logprobs):
            y = torch.tensor([c])
            want = continuation_logprobs(cpu.model, ids, mask, y, torch.ones_like(y, dtype=torch.bool), 0.8, 4,
                                         cpu.tokenizer.eos_token_id)
            assert abs(want.item() - lp) < 1e-3


def test_classifier_scoring_on_cuda_matches_cpu(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.rewards.classifier import SequenceClassifierReward

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_lm_dir), num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(str(tiny_lm_dir)).pad_token_id
    model.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(tiny_lm_dir)).save_pretrained(tmp_path / "rm")
    prompts, completions = ["the movie", "a film was"], [" was great .", " bad"]
    gpu = SequenceClassifierReward(str(tmp_path / "rm"), device="cuda", dtype="float32")(prompts, completions)
    cpu = SequenceClassifierReward(str(tmp_path / "rm"), device="cpu")(prompts, completions)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)
    bf16 = SequenceClassifierReward(str(tmp_path / "rm"), device="cuda")  # dtype auto: bf16 on a GPU
    assert bf16.model.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(prompts, completions), cpu, atol=0.05 * cpu.abs().max().item() + 1e-3, rtol=0)


@pytest.mark.ray
def test_a_scorer_actor_reserves_the_gpu_it_uses_and_one_without_stays_on_the_cpu(ray_session, tiny_lm_dir, tmp_path):
    import ray
    from conftest import save_tiny_rm

    from actors.scorer import ScorerPool

    save_tiny_rm(tmp_path / "rm", tiny_lm_dir)
    spec = {"kind": "classifier", "path": str(tmp_path / "rm"), "device": "auto"}
    on_gpu, on_cpu = ScorerPool(spec, num_gpus_per_actor=1), ScorerPool(spec)
    try:
        devices = [ray.get(pool.actors[0].__ray_call__.remote(lambda self: (str(self.scorer.reward.device), ray.get_gpu_ids())))
                   for pool in (on_gpu, on_cpu)]
        assert devices[0][0].startswith("cuda") and len(devices[0][1]) == 1
        assert devices[1] == ("cpu", [])
        scores = [pool.score(["the movie"], [" was great ."]).mean for pool in (on_gpu, on_cpu)]
        torch.testing.assert_close(scores[0], scores[1], atol=0.05 * scores[1].abs().max().item() + 1e-3, rtol=0)
    finally:
        on_gpu.shutdown(), on_cpu.shutdown()


@pytest.mark.ray
def test_training_step_on_gpu_with_nccl_and_bf16(ray_session, tiny_lm_dir, tmp_path):
    from align.runtime.config import load_config
    from jobs.train_dpo import DpoJobConfig, run

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": " good .", "rejected": " bad ."}) + "\n"
                             for p in ("the movie", "a film", "the plot", "the cast")))
    cfg = load_config(DpoJobConfig, "configs/train_dpo.yaml", [
        f"model={tiny_lm_dir}", f"data.source={pairs}", f"output_dir={tmp_path / 'out'}", f"train.run.storage_path={tmp_path / 'runs'}",
        "train.steps=2", "train.batch_size=2", "train.workers.num_workers=1", "train.workers.use_gpu=true",
        "train.run.log_every=1", "train.workers.collective_timeout_s=60", "dpo.ref_update=soft", "dpo.ref_tau=1"])
    metrics = run(cfg)
    assert metrics["step"] == 2 and metrics["loss"] == metrics["loss"]  # ran, finite
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values()), "fp32 master weights saved, not the bf16 copy"
