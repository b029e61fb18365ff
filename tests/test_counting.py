import jax
import pytest
from flax import nnx

from lmjax.config import ModelConfig, MoEConfig
from lmjax.experiment import list_experiments, load_experiment, load_experiment_module
from lmjax.models import DecoderLM
from lmjax.scaling.counting import param_counts, train_flops_per_token


def built_param_count(cfg: ModelConfig) -> int:
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("cfg", [
    ModelConfig(d_model=64, n_layers=3, n_heads=4, d_ff=128),
    ModelConfig(d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=96, tie_embeddings=False),
    ModelConfig(d_model=48, n_layers=2, n_heads=4, d_ff=192, mlp="gelu", norm="layernorm", position="learned",
                max_seq_len=77),
    ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, moe=MoEConfig(n_experts=4, top_k=2)),
    ModelConfig(d_model=32, n_layers=4, n_heads=4, d_ff=64, mlp="gelu", tie_embeddings=False,
                moe=MoEConfig(n_experts=3, top_k=1, d_ff=40, every=2, n_shared_experts=2)),
    ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, moe=MoEConfig(n_experts=4, top_k=2, granularity=4,
                                                                          n_shared_experts=1)),
], ids=["dense", "gqa-untied", "gelu-layernorm-learned", "moe", "moe-every2-shared-gelu", "moe-granularity4-shared"])
def test_counted_params_equal_built_model(cfg):
    assert param_counts(cfg)["params_total"] == built_param_count(cfg)


def test_llama_7b_count_matches_published():
    # LLaMA-7B: 32 layers, d 4096, 32 heads, SwiGLU d_ff 11008, vocab 32000, untied: 6,738,415,616 weights.
    cfg = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, tie_embeddings=False,
                      max_seq_len=2048)
    assert param_counts(cfg)["params_total"] == 6_738_415_616


def test_train_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=384, d_model=128, n_layers=4, n_heads=4, d_ff=512, mlp="gelu")
    per_layer = 4 * 128 * 128 + 2 * 128 * 512 + 2 * 128  # attention, mlp, two RMSNorm scales
    nonembedding = 4 * per_layer + 128
    expected = 6 * (nonembedding + 128 * 384) + 6 * 4 * 64 * 128  # + output head; causal attention
    assert train_flops_per_token(cfg, seq_len=64) == expected


@pytest.mark.parametrize("dense, moe", [("decoder_tiny", "moe_tiny"), ("decoder_narrow", "moe_narrow")])
def test_moe_evidence_pairs_have_equal_active_params(dense, moe):
    """docs/moe.md compares each pair at equal active parameters: the MoE's two experts per
    token hold as many weights as the dense MLP, so the active counts differ by the routers
    (d_model x n_experts per layer) alone; the MoE holds about 3x the weights in all."""
    dense_cfg, moe_cfg = load_experiment(dense), load_experiment(moe)
    assert dense_cfg.train == moe_cfg.train and dense_cfg.optim == moe_cfg.optim and dense_cfg.data == moe_cfg.data
    d, counts = dense_cfg.model, param_counts(moe_cfg.model)
    routers = d.n_layers * d.d_model * moe_cfg.model.moe.n_experts
    assert counts["params_active"] - routers == param_counts(d)["params_active"] == built_param_count(d)
    assert counts["params_total"] == built_param_count(moe_cfg.model)
    assert 2.5 < counts["params_total"] / param_counts(d)["params_total"] < 3.5


def test_every_shipped_experiment_builds_a_valid_config():
    for name in list_experiments():
        module = load_experiment_module(name, "unknown")[0]
        if hasattr(module, "config"):  # sweep files define sweep() instead
            assert load_experiment(name).name == name


def test_granularity_keeps_expert_params_and_flops_and_grows_the_router():
    """G = 4 by hand: 4 * 4 = 16 experts of width 64 / 4 = 16, 4 * 2 = 8 per token; the router
    d_model x 16; the shared expert keeps width 64. Experts' weights and FLOPs equal G = 1's."""
    def cfg(g):
        return ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64,
                           moe=MoEConfig(n_experts=4, top_k=2, granularity=g, n_shared_experts=1))

    fixed = 4 * 32 * 32 + 2 * 32  # attention and two norms per layer
    expert, shared = 3 * 32 * 16, 3 * 32 * 64  # one fine expert (SwiGLU, width 16); the shared expert
    counts = param_counts(cfg(4))
    assert counts["params_nonembedding"] == 2 * (fixed + 32 * 16 + 16 * expert + shared) + 32
    assert counts["params_active_nonembedding"] == 2 * (fixed + 32 * 16 + 8 * expert + shared) + 32
    coarse = param_counts(cfg(1))
    assert counts["params_total"] - coarse["params_total"] == 2 * 32 * (16 - 4)  # the routers alone
    assert counts["params_active"] - coarse["params_active"] == 2 * 32 * (16 - 4)
    router_flops = 6 * 2 * 32 * (16 - 4)
    assert train_flops_per_token(cfg(4), 64) - train_flops_per_token(cfg(1), 64) == router_flops
