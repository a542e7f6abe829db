"""The demo (symcomm.demo): the plan the head counts allow, Hugging Face configs, the random model
against the dense reference, and SmolLM2-135M-Instruct against Hugging Face's own model at TP 3
(plan full) and TP 2 (ffn_only), its decode through the KV cache against the uncached forward.

Single-process tests: each spawns its ranks (symcomm.demo.rpc). The SmolLM2 tests need its package
(the README's test command installs it) and skip, saying how to install it, where it is missing."""

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from symcomm.demo import smollm2
from symcomm.demo.__main__ import TIMEOUT_S
from symcomm.demo.llama import DemoRank
from symcomm.demo.rpc import RemoteError, RpcRunner
from symcomm.nn import LlamaConfig, ParallelLlama, choose_plan
from test_model import cached_decode

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3)
# transformers 5 keeps rope settings in rope_parameters; 4.x had rope_theta.
HF_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, hidden_act="silu", head_dim=64,
                 attention_bias=False, mlp_bias=False)


class CheckedRank(DemoRank):
    """The demo's rank with what the tests ask of its model besides the demo's own calls."""

    @torch.inference_mode()
    def cached_vs_uncached(self, steps: int) -> float:
        """The largest difference between the logits of a prefill then `steps` one-token steps through
        the KV cache and the uncached forward over the same tokens."""
        model, ids = self.models["parallel"], self.ids
        tokens = torch.randint(0, self.config.vocab_size, (ids.shape[0], steps), generator=torch.Generator())
        full = torch.cat((ids, tokens), 1)
        cached = cached_decode(model, full, ids.shape[1], model.new_cache(ids.shape[0], full.shape[1]))
        return (cached - model(full)).abs().max().item()

    def build(self, plan: str) -> None:
        ParallelLlama(self.config, plan, device="meta")


@pytest.mark.parametrize("tp,plan", [(1, "full"), (2, "ffn_only"), (3, "full"), (4, "ffn_only"), (6, "ffn_only")])
def test_choose_plan_splits_what_the_head_counts_allow(tp, plan):
    chosen, why = choose_plan(SMOLLM2, tp)
    assert chosen == plan
    assert why == ("" if plan == "full" else f"ParallelAttention: num_heads=9 is not divisible by the "
                   f"tensor-parallel size {tp}")


def test_choose_plan_refuses_an_mlp_that_does_not_split():
    with pytest.raises(ValueError, match="intermediate_size=1536 is not divisible by the tensor-parallel size 9"):
        choose_plan(SMOLLM2, 9)


@pytest.mark.parametrize("rope", [dict(rope_parameters={"rope_theta": 1e5, "rope_type": "default"}),
                                  dict(rope_theta=1e5, rope_scaling=None)], ids=["transformers5", "transformers4"])
def test_llama_config_from_hf(rope):
    config = LlamaConfig.from_hf(SimpleNamespace(**HF_CONFIG, **rope))
    assert config == LlamaConfig(**{**SMOLLM2.__dict__, "rope_theta": 1e5, "rms_norm_eps": 1e-5})


@pytest.mark.parametrize("change,error", [
    (dict(rope_parameters={"rope_theta": 5e5, "rope_type": "llama3"}), "rope type='llama3' is not supported"),
    (dict(head_dim=128), "head_dim=128 is not supported (only 64)"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(mlp_bias=True), "mlp_bias=True is not supported"),
])
def test_llama_config_from_hf_refuses_what_it_does_not_compute(change, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        LlamaConfig.from_hf(SimpleNamespace(**{**HF_CONFIG, "rope_theta": 1e5, **change}))


def test_random_model_demo_at_tp_2():
    """The README's demo command where SmolLM2 is not installed: TP=2 equals TP=1, exit status 0."""
    out = subprocess.run([sys.executable, "-m", "symcomm.demo", "--model", "random", "--tp", "2", "--steps", "6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"TP=2 vs TP=1 \(dense\): logits max abs diff \S+, PCC 1\.0000000\d; greedy tokens equal: True",
                     out.stdout), out.stdout


needs_smollm2 = pytest.mark.skipif(not smollm2.available(), reason=f"needs SmolLM2 and transformers: {smollm2.INSTALL}")


def smollm2_ranks(tp):
    with RpcRunner(tp, CheckedRank, "smollm2", "auto", "What is the capital of France?", 1, 0, 0, torch.float32,
                   timeout_s=TIMEOUT_S) as runner:
        yield runner


@pytest.fixture(scope="module")
def tp3():
    yield from smollm2_ranks(3)


@pytest.fixture(scope="module")
def tp2():
    yield from smollm2_ranks(2)


@needs_smollm2
@pytest.mark.parametrize("ranks,plan", [("tp3", "full"), ("tp2", "ffn_only")])
def test_smollm2_matches_hugging_face(request, ranks, plan):
    runner = request.getfixturevalue(ranks)
    assert runner.call("describe")[0][1] == plan
    hf, ours = (runner.call("generate", which, 16, 1)[0] for which in ("hf", "parallel"))
    assert torch.equal(ours.tokens, hf.tokens)
    assert runner.call("text", hf.tokens)[0] == "The capital of France is Paris.<|im_end|>"
    diff, pcc = runner.call("compare", "parallel", "hf")[0]
    # float32 throughout; the two differ in summation order only (observed: about 1e-4).
    assert diff < 2e-3 and pcc > 0.999999, (diff, pcc)


@needs_smollm2
def test_smollm2_cached_decode_at_tp_3_matches_the_uncached_forward(tp3):
    assert max(tp3.call("cached_vs_uncached", 6)) < 1e-4


@needs_smollm2
def test_smollm2_plan_full_at_tp_2_names_the_head_count(tp2):
    with pytest.raises(RemoteError, match=r"rank 0: ValueError: ParallelAttention: num_heads=9 is not divisible by "
                                          r"the tensor-parallel size 2"):
        tp2.call("build", "full")
