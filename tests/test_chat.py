"""Chat templates end to end (docs/chat.md): alignd.chat against transformers' own rendering, a conversation
generated and scored identically across the roles (real gRPC, tiny models saved with a template), OpenRLHF-style
`value_head` reward models served as they are, and TRL's conversational data files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from alignd.chat import ChatError, ChatFormat, prompt_text
from alignd.conversations import chat_score_item, policy_prompt
from alignd.data import load_comparisons, load_demonstrations, load_prompts
from alignd.data.records import DataError
from alignd.services.learner import supervised as sv
from alignd.v1 import (
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

from conftest import assert_invalid, start_roles, stop_roles

# ChatML-like, with the tiny tokenizer's own special tokens.
TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}]
REPLY = "Blue, mostly."


def with_template(src, dst):
    """A copy of a tiny model directory whose tokenizer carries TEMPLATE (saved as users save one)."""
    import shutil

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(dst))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def chat_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {
        "lm": with_template(tiny_models["lm"], root / "lm"),
        "reward": with_template(tiny_models["reward"], root / "reward"),
    }


@pytest.fixture(scope="module")
def fmt(chat_models):
    return ChatFormat.resolve(AutoTokenizer.from_pretrained(str(chat_models["lm"])))


# -- alignd.chat ---------------------------------------------------------------------------------------------------


def test_prompt_and_reply_render_as_transformers_does(fmt):
    tok = fmt.tokenizer
    assert fmt.templated and fmt.source == "model" and len(fmt.digest) == 12
    want = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert want.endswith("<|bos|>assistant\n")
    assert fmt.prompt_ids(CONV) == tok(want, add_special_tokens=False)["input_ids"]
    # The reply: what the whole conversation adds after the prompt, cut after EOS (the template's "\n" after it
    # is never generated).
    full = tok.apply_chat_template([*CONV, {"role": "assistant", "content": REPLY}], tokenize=False)
    assert full.startswith(want)
    reply_ids = fmt.response_ids(CONV, REPLY, stop_ids=[tok.eos_token_id])
    assert reply_ids[-1] == tok.eos_token_id
    assert tok.decode(reply_ids) == REPLY + "<|eos|>"
    # A text prompt is the user's message after the format's system message.
    assert fmt.with_system("Be brief.").prompt_ids("Name a colour") == fmt.prompt_ids(CONV)


def test_plain_format_keeps_text_as_it_was(tiny_models):
    tok = AutoTokenizer.from_pretrained(str(tiny_models["lm"]))
    for setting in ("auto", "none"):  # auto on a model without a template is plain
        plain = ChatFormat.resolve(tok, setting)
        assert not plain.templated and plain.digest == ""
        assert plain.prompt_ids("Call me Ishmael.") == tok("Call me Ishmael.", add_special_tokens=False)["input_ids"]
        assert plain.prompt_text(CONV) == "Be brief.\n\nName a colour"
        assert (
            plain.response_ids("x", " Some years ago") == tok(" Some years ago", add_special_tokens=False)["input_ids"]
        )


def test_template_from_a_file_and_bad_conversations(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_models["lm"]))
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    f = ChatFormat.resolve(tok, str(path))
    assert f.source == f"file:{path}" and f.prompt_text(CONV).endswith("<|bos|>assistant\n")
    with pytest.raises(ChatError, match="cannot read"):
        ChatFormat.resolve(tok, str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatError, match="must not end with an assistant"):
        f.prompt_ids([*CONV, {"role": "assistant", "content": "x"}])
    with pytest.raises(ChatError, match="role must be one of"):
        f.prompt_ids([{"role": "narrator", "content": "x"}])
    # A template that renders the prompt differently once a reply follows cannot split the reply off.
    odd = ChatFormat(tok, "{% if add_generation_prompt %}A{% else %}B{% endif %}{{ messages[-1]['content'] }}", "x")
    with pytest.raises(ChatError, match="prefix-consistent"):
        odd.response_ids(CONV, REPLY)
    assert prompt_text(CONV) == "Name a colour" and prompt_text("text") == "text"


def test_sft_and_rm_encodings_use_the_template(fmt):
    eos = fmt.eos_token_id
    ids, labels = sv.encode_demo(fmt, CONV, REPLY, max_tokens=128)
    n_prompt = len(fmt.prompt_ids(CONV))
    assert ids[:n_prompt] == fmt.prompt_ids(CONV)
    assert all(x == sv.IGNORE for x in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == eos and ids[n_prompt:].count(eos) == 1
    seq, start = sv.encode_pair(fmt, CONV, REPLY, max_tokens=128)
    assert seq == ids and start == n_prompt  # the RM scores what the SFT model learned to write


# -- the roles -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_roles(chat_models, tmp_path_factory):
    specs = [
        (role, {"model": {"path": str(chat_models[key])}, "torch_threads": 1}, tmp_path_factory.mktemp(role))
        for role, key in (("policy", "lm"), ("reward", "reward"), ("reference", "lm"))
    ]
    servers = start_roles(specs)
    yield {s.role: s for s in servers}
    stop_roles(servers)


def test_a_conversation_is_generated_and_scored_identically_across_roles(chat_roles, fmt, chat_models):
    policy = policy_pb2_grpc.PolicyServiceStub(chat_roles["policy"].channel)
    reward = reward_pb2_grpc.RewardServiceStub(chat_roles["reward"].channel)
    reference = reference_pb2_grpc.ReferenceServiceStub(chat_roles["reference"].channel)
    sampling = policy_pb2.SamplingParams(temperature=1.0, max_new_tokens=8, seed=7, num_samples=2)
    by_messages = policy.Generate(
        policy_pb2.GenerateRequest(prompts=[policy_prompt(CONV)], sampling=sampling, return_text=True), timeout=60
    )
    by_ids = policy.Generate(
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=fmt.prompt_ids(CONV)))], sampling=sampling
        ),
        timeout=60,
    )
    assert [list(s.prompt_token_ids) for s in by_messages.samples] == [fmt.prompt_ids(CONV)] * 2
    assert [list(s.token_ids) for s in by_messages.samples] == [list(s.token_ids) for s in by_ids.samples]
    # The reward role renders a conversation and reply as the policy's tokens of them.
    reply = REPLY
    tokens = fmt.response_ids(CONV, reply, stop_ids=[fmt.eos_token_id])
    got = reward.Score(
        reward_pb2.ScoreRequest(
            items=[
                chat_score_item(CONV, reply),
                reward_pb2.ScoreItem(
                    tokens=reward_pb2.TokenPair(prompt_token_ids=fmt.prompt_ids(CONV), response_token_ids=tokens)
                ),
            ]
        ),
        timeout=60,
    )
    assert got.scores[0] == pytest.approx(got.scores[1], abs=1e-6)
    # The reference takes the policy's ids of the same conversation.
    lp = reference.LogProbs(
        reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(
                    prompt_token_ids=by_messages.samples[0].prompt_token_ids,
                    response_token_ids=by_messages.samples[0].token_ids,
                )
            ]
        ),
        timeout=60,
    )
    assert len(lp.results[0].logprobs) == len(by_messages.samples[0].token_ids)
    for role in ("policy", "reward"):
        i = model_pb2_grpc.ModelServiceStub(chat_roles[role].channel).GetInfo(model_pb2.GetInfoRequest(), timeout=30)
        assert (i.info.chat_template, i.info.chat_template_sha256) == ("model", fmt.digest)


def test_bad_conversations_are_invalid_argument(chat_roles):
    policy = policy_pb2_grpc.PolicyServiceStub(chat_roles["policy"].channel)
    reward = reward_pb2_grpc.RewardServiceStub(chat_roles["reward"].channel)
    sampling = policy_pb2.SamplingParams(max_new_tokens=4)

    def gen(messages):
        return lambda: policy.Generate(
            policy_pb2.GenerateRequest(prompts=[policy_prompt(messages)], sampling=sampling), timeout=30
        )

    assert_invalid(gen([{"role": "assistant", "content": "hi"}]), "prompts[0].messages", "assistant")
    assert_invalid(gen([{"role": "wizard", "content": "hi"}]), "prompts[0].messages", "role must be one of")
    empty = policy_pb2.Prompt(messages=common_pb2.Conversation())
    assert_invalid(
        lambda: policy.Generate(policy_pb2.GenerateRequest(prompts=[empty], sampling=sampling), timeout=30),
        "prompts[0].messages",
        "empty conversation",
    )
    assert_invalid(
        lambda: reward.Score(reward_pb2.ScoreRequest(items=[chat_score_item(CONV, "")]), timeout=30),
        "items[0].chat.response",
        "empty response",
    )


# -- OpenRLHF reward models ----------------------------------------------------------------------------------------


def openrlhf_rm(src, dst, *, mean: float, std: float):
    """A tiny Llama reward model saved the way OpenRLHF saves one: `value_head` instead of `score`, the reward's
    running mean and std as buffers, normalize_reward in its config."""
    import shutil

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    state = load_file(str(f))
    state["value_head.weight"] = state.pop("score.weight")
    state["mean"], state["std"] = torch.tensor([mean]), torch.tensor([std])
    save_file(state, str(f), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["normalize_reward"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, state


def test_openrlhf_value_head_rm_scores_as_in_process(tiny_models, tmp_path):
    from alignd.models.tiny import build_tiny_model

    src = build_tiny_model(tmp_path / "llama-rm", arch="llama", kind="reward", seed=3)
    path, state = openrlhf_rm(src, tmp_path / "openrlhf-rm", mean=0.25, std=2.0)
    [server] = start_roles([("reward", {"model": {"path": str(path)}, "torch_threads": 1}, tmp_path / "role")])
    try:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel)
        tok = AutoTokenizer.from_pretrained(str(path))
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello there friend", "a b c d e", "x")]
        got = stub.Score(
            reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(response_token_ids=s)) for s in seqs]
            ),
            timeout=60,
        )
        # OpenRLHF's forward: value_head over the backbone's last hidden state at the last token, then
        # (reward - mean) / std.
        backbone = AutoModel.from_pretrained(str(path)).eval()
        with torch.no_grad():
            want = [
                ((backbone(torch.tensor([s])).last_hidden_state[0, -1] @ state["value_head.weight"][0]).item() - 0.25)
                / 2.0
                for s in seqs
            ]
        assert got.scores == pytest.approx(want, abs=1e-5)
        assert len({round(x, 4) for x in got.scores}) == 3
        assert "value_head_adopted" in server.log()
    finally:
        stop_roles([server])


# -- TRL's conversational data -------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_conversational_files_load(tmp_path):
    user = [{"role": "user", "content": "Say hi"}]
    hi, bye = {"role": "assistant", "content": "Hi!"}, {"role": "assistant", "content": "Bye."}
    demos, rep = load_demonstrations(
        write_jsonl(
            tmp_path / "d.jsonl",
            [{"messages": [*user, hi]}, {"prompt": user, "completion": [bye]}, {"prompt": "text", "completion": "x"}],
        )
    )
    assert [(d.prompt, d.completion) for d in demos] == [(user, "Hi!"), (user, "Bye."), ("text", "x")]
    comps, rep = load_comparisons(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": user, "chosen": [hi], "rejected": [bye]}])
    )
    assert (comps[0].prompt, comps[0].completions, comps[0].ranking, rep.format) == (
        user,
        ["Hi!", "Bye."],
        [0, 1],
        "pairwise",
    )
    comps, rep = load_comparisons(
        write_jsonl(tmp_path / "c.jsonl", [{"chosen": [*user, hi], "rejected": [*user, bye]}])
    )
    assert (comps[0].prompt, comps[0].completions, rep.format) == (user, ["Hi!", "Bye."], "conversation")
    prompts, _ = load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"prompt": user}, {"prompt": "plain"}]))
    assert prompts == [user, "plain"]
    # Bad conversational lines name the file, line and problem.
    for rows, needle in (
        ([{"chosen": [*user, hi], "rejected": [{"role": "user", "content": "other"}, bye]}], "differ before"),
        ([{"messages": [*user]}], "must end with an assistant"),
        ([{"prompt": [*user, hi], "completion": "x"}], "ends with an assistant"),
        ([{"prompt": [{"role": "user"}], "completion": "x"}], "content must be a string"),
    ):
        loader = load_comparisons if "chosen" in rows[0] else load_demonstrations
        with pytest.raises(DataError, match=needle) as info:
            loader(write_jsonl(tmp_path / "bad.jsonl", rows))
        assert str(info.value).startswith(f"{tmp_path / 'bad.jsonl'}:1: ")
