"""lm-evaluation-harness: scores against the model's own log-probabilities and `lmjax eval`'s
token losses; the shipped task end to end; bad task files."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from lm_eval.api.instance import Instance  # the test extra installs lm-eval: a missing one fails here

from lmjax.cli import main
from lmjax.config import Config, ConfigError, DataConfig, ModelConfig
from lmjax.data.tokenizer import ByteTokenizer
from lmjax.families import family_of
from lmjax.harness import LmjaxLM
from lmjax.runs import evaluate_run
from lmjax.train.loop import train

TASK = Path(__file__).parents[1] / "experiments" / "lm_eval" / "python_stdlib" / "python_stdlib.yaml"
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, init_std=0.5)
PAIRS = [("def f(x):\n", "    return x"), ("import o", "s"), ("", "class A:"), ("for i in range(10):", " pass")]


def request(*args):
    return Instance("loglikelihood", {}, args, 0)


def harness(family):
    cfg = dataclasses.replace(MODEL, family=family, **({"n_decoder_layers": 1} if family == "encoder_decoder" else {}))
    model = family_of(cfg).build(cfg, nnx.Rngs(0))
    return LmjaxLM(model, Config(model=cfg, data=DataConfig(seq_len=16)), ByteTokenizer(), batch_size=3), model


def reference(model, family, tokenizer, context, continuation):
    """Sum of log p(continuation token | everything before it), one unpadded request at a time
    (the forward pass jitted: one program per request's shapes, not one per op)."""
    forward = nnx.jit(lambda m, *tokens: m(*tokens))
    ctx, cont = list(tokenizer.encode(context)), list(tokenizer.encode(continuation))
    if family == "decoder":
        full = (ctx or [tokenizer.eos_id]) + cont
        logits = forward(model, jnp.asarray([full[:-1]]))[0]
        rows, targets = range(len(full) - 1 - len(cont), len(full) - 1), cont
    else:
        logits = forward(model, jnp.asarray([ctx]), jnp.asarray([[tokenizer.bos_id] + cont[:-1]]))[0]
        rows, targets = range(len(cont)), cont
    log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return sum(float(log_probs[r, t]) for r, t in zip(rows, targets))


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_loglikelihood_is_the_sum_of_the_models_token_log_probabilities(family):
    lm, model = harness(family)
    pairs = PAIRS if family == "decoder" else [p for p in PAIRS if p[0]]
    scores = lm.loglikelihood([request(*p) for p in pairs])  # 4 requests in batches of 3: one padded batch
    for (context, continuation), (score, _) in zip(pairs, scores):
        np.testing.assert_allclose(score, reference(model, family, lm.tokenizer, context, continuation), atol=1e-4)


def test_masked_lm_encoders_refuse_with_one_line():
    with pytest.raises(ConfigError, match="masked-LM encoder"):
        harness("encoder")


def test_generate_until_cuts_greedy_text_at_the_first_stop_string():
    from lmjax.generate import generate

    lm, model = harness("decoder")
    prompt = "def f(x):"
    ids = generate(model, [list(lm.tokenizer.encode(prompt))], 12, temperature=0.0,
                   stop_tokens=(lm.tokenizer.eos_id,))[0]
    full = lm.tokenizer.decode([int(i) for i in ids if int(i) != lm.tokenizer.eos_id])
    stop = full[3:5]
    out = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)])
    assert out == [full[:full.index(stop)]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    cfg = tiny_config(root / "run", steps=6, eval_every=100, eval_batches=1, sample_tokens=0, checkpoint_every=100)
    train(cfg, root / "run")
    return root / "run"


def test_rolling_loglikelihood_equals_lmjax_eval_token_losses(run, tmp_path):
    """Documents of 31 bytes + eos fill a 32-token stride exactly, so window i of `lmjax eval
    --data` holds document i alone from its first token: eval's losses at positions 0..29 are
    the document's tokens 1..30 given the ones before, what a rolling log-likelihood sums."""
    lines = [line for line in Path(json.__file__).read_text().splitlines() if len(line.strip()) >= 31]
    documents = [line.strip()[:31] for line in lines[:10]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    evaluate_run(run, data_source=str(tmp_path / "docs.jsonl"), token_losses_file=tmp_path / "losses.npy")
    losses = np.load(tmp_path / "losses.npy")
    lm = LmjaxLM.from_run(run)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), 0) for d in documents])
    for i in range(len(losses)):
        np.testing.assert_allclose(rolling[i], -losses[i, :30].sum(), atol=1e-4)


def test_shipped_task_runs_end_to_end_with_accuracy_and_stderr(run, capsys):
    assert main(["eval", str(run), "--tasks", str(TASK), "--limit", "8", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["python_stdlib"]
    assert 0.0 <= results["acc,none"] <= 1.0 and results["acc_stderr,none"] > 0


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("task: [unclosed", "not valid YAML"),
                                              ("- just a list", "not an lm-eval task config")])
def test_missing_or_malformed_task_file_is_one_clear_line(run, capsys, tmp_path, content, message):
    path = tmp_path / "task.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["eval", str(run), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
