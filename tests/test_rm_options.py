"""Reward-model options: mean pooling, a smaller RM (truncated blocks), the head-only fit, and the
reward role loading an RM of another architecture. Tiny models; the reward role over real gRPC."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from test_supervised import _comparisons
from transformers import AutoConfig, AutoModelForSequenceClassification

from alignd import rlmath
from alignd.config import ModelConfig
from alignd.models.handle import load_scalar_head_model
from alignd.models.scoring import SCORE_POOLING_KEY, pooled_features, score_sequences
from alignd.services.learner import jobs
from alignd.services.learner import supervised as sv
from alignd.v1 import learner_pb2, model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import start_role, stop_role

TOKENIZER_OF = "reward"  # the conftest `tok` fixture loads the reward model's tokenizer


def _rm(path, pooling: str = "mean"):
    model = load_scalar_head_model(ModelConfig(path=str(path)), allow_new_head=True)
    setattr(model.config, SCORE_POOLING_KEY, pooling)
    return model


def _naive_mean_scores(model, seqs, starts):
    """One unpadded sequence at a time: the mean of its response tokens' final hidden states, then the head."""
    out = []
    with torch.no_grad():
        for s, b in zip(seqs, starts):
            h = model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0]  # (L, H)
            out.append(float(model.score(h[min(b, len(s) - 1) :].mean(0))))
    return out


@pytest.mark.parametrize("arch", ["reward", "llama"])
def test_mean_pooling_equals_a_per_sequence_loop(tiny_models, arch):
    model = _rm(tiny_models[arch])
    seqs = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [30]]
    starts = [3, 1, 2, 0]
    with torch.no_grad():
        batched = score_sequences(model, seqs, pad_id=0, starts=starts).tolist()
    assert batched == pytest.approx(_naive_mean_scores(model, seqs, starts), abs=1e-5)
    # Not the last-token score: the pooling changes the function.
    setattr(model.config, SCORE_POOLING_KEY, "last")
    with torch.no_grad():
        last = score_sequences(model, seqs, pad_id=0, starts=starts).tolist()
    assert max(abs(a - b) for a, b in zip(batched, last)) > 1e-3
    setattr(model.config, SCORE_POOLING_KEY, "mean")
    with pytest.raises(ValueError, match="response start"):
        score_sequences(model, seqs, pad_id=0)


@pytest.mark.parametrize("arch", ["reward", "llama"])
def test_truncated_rm_saves_and_loads_as_the_smaller_model(tiny_models, tmp_path, arch):
    model = _rm(tiny_models[arch])
    assert sv.truncate_layers(model, 1) == 2
    assert model.config.num_hidden_layers == 1
    model.save_pretrained(tmp_path / "rm")
    again = load_scalar_head_model(ModelConfig(path=str(tmp_path / "rm")), allow_new_head=False)
    assert again.config.num_hidden_layers == 1 and getattr(again.config, SCORE_POOLING_KEY) == "mean"
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in _rm(tiny_models[arch]).parameters())
    seqs, starts = [[5, 6, 7, 8], [9, 10, 11]], [2, 1]
    with torch.no_grad():
        assert score_sequences(again, seqs, 0, starts=starts).tolist() == pytest.approx(
            score_sequences(model, seqs, 0, starts=starts).tolist(), abs=1e-6
        )
    with pytest.raises(ValueError, match=">= 1"):
        sv.truncate_layers(model, 0)


def test_head_fit_learns_rankings_freezes_the_backbone_and_is_at_its_optimum(tiny_models, tok):
    model = _rm(tiny_models["reward"])
    backbone = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    train, val = _comparisons(120, 0), _comparisons(40, 1)
    l2 = 0.05
    res = sv.fit_rm_head(model, tok, train, val=val, l2=l2, max_tokens=32)
    assert res.extra["val_accuracy"] > 0.85 and res.extra["val_accuracy"] > res.extra["val_accuracy_before"]
    assert all(torch.equal(backbone[k], v) for k, v in model.base_model.state_dict().items())
    # The reported accuracy is that of the model as it will be served (scores through the model).
    assert res.extra["val_accuracy"] == pytest.approx(sv.pairwise_accuracy(model, tok, val, max_tokens=32))
    # Optimality of the stated objective, recomputed independently through the model: the gradient of
    # rm_loss + l2 * |w * sd|^2 with respect to the head (sd: the features' standard deviation) vanishes.
    pairs = [sv.encode_pair(tok, p, c, max_tokens=32) for p, cs, _r in train for c in cs]
    with torch.no_grad():
        feats = pooled_features(
            model, [s for s, _ in pairs], [b for _, b in pairs], pad_id=tok.pad_token_id or 0
        ).double()
    sd = feats.std(0).clamp_min(1e-6)
    w = model.score.weight.detach().double()[0].clone().requires_grad_(True)
    scores = feats @ w
    loss = rlmath.rm_loss(list(torch.split(scores, [len(cs) for _p, cs, _r in train])), [r for *_, r in train])
    (loss + l2 * ((w * sd) ** 2).sum()).backward()
    assert float((w.grad * (1 / sd)).norm()) < 1e-3 * float(((w * sd).detach()).norm() + 1)


@pytest.mark.parametrize("train_mode", ["head", "full"])
def test_unit_std_scales_scores_of_the_training_completions_to_std_one_keeping_their_order(
    tiny_models, tok, train_mode
):
    """rm.score_scale: unit_std divides the head by the spread of the RM's scores over its training completions,
    measured here through the model as served (score_sequences, independent of the fit's own features)."""
    train, val = _comparisons(60, 0), _comparisons(20, 1)
    pairs = [sv.encode_pair(tok, p, c, max_tokens=32) for p, cs, _r in train for c in cs]
    got = {}
    for unit in (False, True):
        torch.manual_seed(0)
        model = _rm(tiny_models["reward"])
        if train_mode == "head":
            res = sv.fit_rm_head(model, tok, train, val=val, l2=0.05, max_tokens=32, unit_std=unit)
        else:
            res = sv.train_rm(model, tok, train, val=val, lr=1e-3, batch_size=8, max_tokens=32, unit_std=unit)
        with torch.no_grad():
            got[unit] = (
                score_sequences(
                    model, [s for s, _ in pairs], tok.pad_token_id or 0, starts=[b for _, b in pairs]
                ).double(),
                res,
            )
    plain, scaled = got[False][0], got[True][0]
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-4) and float(plain.std()) != pytest.approx(1.0, rel=1e-2)
    assert torch.allclose(scaled * float(plain.std()), plain, atol=1e-5)  # the same scores, rescaled
    assert got[True][1].extra["score_scale"] == pytest.approx(1 / float(plain.std()), rel=1e-4)
    assert got[True][1].extra["val_accuracy"] == got[False][1].extra["val_accuracy"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rm_job_writes_a_smaller_mean_pooled_rm_that_the_reward_role_loads(tiny_models, tok, tmp_path):
    """The learner's RM job (train: head, layers: 1, pooling: mean), then LoadWeights of its output into a
    reward role serving the 2-block model: the role loads the smaller model whole and scores like it."""
    comps = _jsonl(
        tmp_path / "comps.jsonl", [{"prompt": p, "completions": c, "ranking": r} for p, c, r in _comparisons(100, 0)]
    )
    demos = _jsonl(tmp_path / "demos.jsonl", [{"prompt": "Say something:", "completion": " good nice"}])
    req = learner_pb2.TrainRewardModelRequest(
        job_id="rm-1",
        init_model_dir=str(tiny_models["lm"]),
        comparisons_path=str(comps),
        demonstrations_path=str(demos),
        output_dir=str(tmp_path / "rm"),
        config_yaml="train: head\npooling: mean\nlayers: 1\nhead_l2: 0.05\nmax_tokens: 32\nvalidation_fraction: 0.25\n",
    )
    resp = jobs.train_reward_model(req, betas=(0.9, 0.95))
    assert resp.val_accuracy > 0.75 and resp.validation_comparisons == 25 and resp.train_comparisons == 75
    saved = AutoConfig.from_pretrained(tmp_path / "rm")
    assert saved.num_hidden_layers == 1 and getattr(saved, SCORE_POOLING_KEY) == "mean"
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()

    server = start_role(
        "reward",
        {
            "model": {"path": str(tiny_models["reward"])},
            "paths": {"roots": [str(tmp_path), str(tiny_models["llama"].parent)]},
        },
        tmp_path / "reward",
    )
    try:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel)
        models = model_pb2_grpc.ModelServiceStub(server.channel)
        before = models.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
        loaded = models.LoadWeights(
            model_pb2.LoadWeightsRequest(path=str(tmp_path / "rm"), version=before.weight_version + 1), timeout=60
        )
        assert loaded.version == before.weight_version + 1
        info = models.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
        assert info.num_parameters < before.num_parameters and info.weight_version == loaded.version
        pairs = [
            (tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
            for p, c in [("Say something:", " good good nice"), ("Say something:", " bad awful"), ("Hi", " fine")]
        ]
        items = [
            reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r))
            for p, r in pairs
        ]
        scored = stub.Score(reward_pb2.ScoreRequest(items=items), timeout=30)
        expected = [
            s + resp.score_bias
            for s in _naive_mean_scores(trained, [p + r for p, r in pairs], [len(p) for p, _ in pairs])
        ]
        assert list(scored.scores) == pytest.approx(expected, abs=1e-5)
        assert scored.scores[0] > scored.scores[1]  # it learnt the preference
        # A directory of another architecture without a trained head is refused, nothing changed.
        with pytest.raises(grpc.RpcError) as err:
            models.LoadWeights(
                model_pb2.LoadWeightsRequest(path=str(tiny_models["llama"]), version=loaded.version + 1), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "path" in err.value.details()
        assert models.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version == loaded.version
        assert list(stub.Score(reward_pb2.ScoreRequest(items=items), timeout=30).scores) == pytest.approx(
            list(scored.scores)
        )
    finally:
        stop_role(server)
