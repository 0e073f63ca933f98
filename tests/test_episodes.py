"""Multi-turn episodes (SPEC §7): token-exact rollouts under a chat template that rewrites
history, environments in TRL's and gym's shapes, budgets, and bad tools / environments."""

import pytest
import torch

from advantage.engine.configlib import ConfigError
from advantage.engine.episodes import EpisodeError, Episodes, EpisodeSettings
from advantage.engine.rollout import Rollout, SamplingParams, pad_completions, pad_prompts
from advantage.engine.tools import ToolCallParser, tool_schema

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen3's rule: an assistant turn that is not the last message loses its <think> block
QWEN3_LIKE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set c = m.content -%}"
    "{%- if not loop.last and '</think>' in c -%}{%- set c = c.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' -%}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat_tokenizer():
    """One token per character, plus <|im_start|> and <|im_end|> (the end of a turn)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from advantage.tasks.tiny import CHARS

    specials = ["<pad>", IM_END, "<unk>", IM_START]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS + "{}_|"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token=IM_END, unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START]})
    tokenizer.chat_template = QWEN3_LIKE
    return tokenizer


class ScriptedBackend:
    """Returns scripted model turns (one list per turn) and records every token it 'sampled'."""

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns, self.sampled, self.calls = tokenizer, turns, [], 0

    def generate(self, prompts, n, params):
        text = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        whole = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = whole[: params.max_new_tokens]  # the turn ends where its script ends
        completions = [list(ids) for _ in range(len(prompts) * n)]
        self.sampled.append(list(ids))
        pad = self.tokenizer.pad_token_id
        p_ids, p_mask = pad_prompts(prompts, pad)
        lp = [[-0.5] * len(c) for c in completions]
        c_ids, c_mask, logprobs = pad_completions(completions, pad, lp)
        ended = len(ids) == len(whole)  # else cut by max_new_tokens
        return Rollout(
            prompt_ids=p_ids.repeat_interleave(n, 0),
            prompt_mask=p_mask.repeat_interleave(n, 0),
            completion_ids=c_ids,
            completion_mask=c_mask,
            truncated=torch.full((len(completions),), not ended),
            logprobs=logprobs,
        )


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


TURN_1 = '<think>\nI need the tool.\n</think>\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'
TURN_2 = "<think>\nDone.\n</think>\n12<|im_end|>"


def test_trained_ids_are_the_sampled_ids_plus_the_environment_ids():
    tokenizer = chat_tokenizer()
    backend = ScriptedBackend(tokenizer, [TURN_1, TURN_2])
    prompt = [{"role": "user", "content": "what is 3*4?"}]

    def encode(p):
        text = tokenizer.apply_chat_template(
            p, tools=[multiply], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    episodes = Episodes(
        backend, tokenizer, encode, EpisodeSettings(max_turns=4), tools=[multiply],
        parser=ToolCallParser("hermes", ["multiply"]),
    )  # fmt: skip
    out = episodes.sample([{"prompt": prompt}], [prompt], 2, SamplingParams(max_new_tokens=200))
    r = out.rollout
    reply = "\n<|im_start|>user\n<tool_response>\n12\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    env_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    sampled_1, sampled_2 = backend.sampled
    for i in range(2):
        trained = r.completion_ids[i][r.completion_mask[i]].tolist()
        assert trained == sampled_1 + env_ids + sampled_2  # token for token
        assert r.action_mask[i][r.completion_mask[i]].tolist() == (
            [True] * len(sampled_1) + [False] * len(env_ids) + [True] * len(sampled_2)
        )
        lp = r.logprobs[i][r.completion_mask[i]]
        assert (lp[len(sampled_1) : len(sampled_1) + len(env_ids)] == 0).all()
    # the messages the reward functions see, as TRL's
    assert [m["role"] for m in out.completions[0]] == ["assistant", "tool", "assistant"]
    assert out.completions[0][1] == {"role": "tool", "name": "multiply", "content": "12"}
    # re-rendering the history through this template would drop turn 1's <think> block:
    # the trainer would learn from tokens that were never sampled
    rerendered = encode(prompt + out.completions[0][:2])
    assert rerendered != r.prompt_ids[0][r.prompt_mask[0]].tolist() + sampled_1 + env_ids


class CounterEnv:
    """TRL's environment shape: reset(**row), public methods are tools, get_reward()."""

    def reset(self, **row):
        self.total = 0
        return None

    def add(self, amount: str) -> str:
        """Add to the counter.

        Args:
            amount: how much to add
        """
        self.total += int(amount)
        return str(self.total)

    def get_reward(self) -> float:
        return float(self.total)


class GymEnv:
    """The gym shape: reset(row) -> first message, step(message) -> (reply, reward, done)."""

    def reset(self, row):
        self.turn = 0
        return " (go)"

    def step(self, message):
        self.turn += 1
        return f"turn {self.turn}", 0.5, self.turn >= 2


def plain_episodes(turns, **kwargs):
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = None  # plain text: replies through reply_template
    backend = ScriptedBackend(tokenizer, turns)
    settings = kwargs.pop("settings", EpisodeSettings(max_turns=3, reply_template="[{content}]"))
    encode = lambda p: tokenizer(p)["input_ids"]  # noqa: E731
    return Episodes(backend, tokenizer, encode, settings, **kwargs), tokenizer


def test_trl_environment_methods_are_its_tools_and_it_scores():
    episodes, tok = plain_episodes(
        ["<calc>5</calc>", "done"],
        environment_factory=CounterEnv,
        parser=ToolCallParser(
            r"<calc>(?P<arguments>.*?)</calc>",
            stop="</calc>",
            schemas=[tool_schema(CounterEnv.add)],
        ),
    )
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=20))
    env = out.reward_kwargs["environments"][0]
    assert env.total == 5 and out.completions[0][1]["content"] == "5"
    text = tok.decode(out.rollout.completion_ids[0][out.rollout.completion_mask[0]])
    assert text == "<calc>5</calc>[5]done"


def test_gym_environment_rewards_sit_on_the_last_token_of_their_turn():
    episodes, tok = plain_episodes(["ab", "cd", "ef"], environment_factory=GymEnv)
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=2))
    r = out.rollout
    # reset's text joins the prompt; turns "ab" [turn 1] "cd" [turn 2]: done after turn 2
    assert tok.decode(r.prompt_ids[0][r.prompt_mask[0]], skip_special_tokens=True) == "x (go)"
    assert tok.decode(r.completion_ids[0][r.completion_mask[0]]) == "ab[turn 1]cd"
    rewards = r.turn_rewards[0][r.completion_mask[0]].tolist()
    assert rewards[1] == 0.5 and rewards[-1] == 0.5 and sum(rewards) == 1.0


@pytest.mark.parametrize(
    ("reward", "done", "message"),
    [
        (float("nan"), False, r"GymBad\.step returned reward nan \(float\) in episode 0"),
        (1e39, False, r"returned reward 1e\+39 .*within float32's range"),
        ("1.0", False, r"returned reward '1\.0' \(str\)"),
        ([1.0], False, r"returned reward \[1\.0\] \(list\)"),
        (0.5, "no", r"GymBad\.step returned done='no' \(str\) in episode 0; expected True or"),
    ],
)
def test_gym_step_rewards_are_checked_as_reward_functions_are(reward, done, message):
    # an adversarial probe: NaN reached the advantages, "1.0" counted as 1, done="no" as done
    class GymBad(GymEnv):
        def step(self, text):
            return "reply", reward, done

    episodes, _ = plain_episodes(["ab", "cd"], environment_factory=GymBad)
    with pytest.raises(EpisodeError, match=message):
        episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=2))


def test_an_environment_that_never_returns_stops_the_run_by_tool_timeout():
    # an adversarial probe: a gym step that never returned hung the run
    import time

    class Stuck(GymEnv):
        def step(self, text):
            time.sleep(30)

    episodes, _ = plain_episodes(["ab", "cd"], environment_factory=Stuck, tool_timeout=0.2)
    start = time.perf_counter()
    with pytest.raises(EpisodeError, match=r"Stuck\.step did not return within rollout\."
                       r"tool_timeout=0\.2s in episode 0 \(row \{'prompt': 'x'\}\)"):  # fmt: skip
        episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=2))
    assert time.perf_counter() - start < 15  # not the step's 30 s


def test_an_episode_never_runs_past_the_model_positions():
    # an adversarial probe: 400-character replies took episodes to 833 tokens on a 512-position
    # model, with no error or truncation
    class Chatty(GymEnv):
        def step(self, message):
            return "z" * 40, 0.0, False

    settings = EpisodeSettings(max_turns=5, reply_template="[{content}]", context=24)
    episodes, _ = plain_episodes(["ab", "cd"], environment_factory=Chatty, settings=settings)
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=2))
    r = out.rollout
    used = int(r.prompt_mask[0].sum()) + int(r.completion_mask[0].sum())
    assert used == 24 and bool(r.truncated[0])


def test_budgets_end_and_truncate_episodes():
    calls = ToolCallParser(
        r"<calc>(?P<arguments>.*?)</calc>", stop="</calc>", schemas=[tool_schema(lambda_tool)]
    )
    # the model keeps calling: max_turns ends it, truncated
    episodes, _ = plain_episodes(["<calc>2</calc>"], tools=[lambda_tool], parser=calls)
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=20))
    assert bool(out.rollout.truncated[0]) and len(out.completions[0]) == 5  # 3 turns, 2 replies
    # a token budget cuts the episode inside the environment's reply
    settings = EpisodeSettings(max_turns=3, max_episode_tokens=17, reply_template="[{content}]")
    episodes, _ = plain_episodes(
        ["<calc>2</calc>"], tools=[lambda_tool], parser=calls, settings=settings
    )
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=20))
    assert bool(out.rollout.truncated[0]) and int(out.rollout.completion_mask[0].sum()) == 17


def test_a_call_in_the_last_turn_does_not_run():
    """As TRL's tool loop: the calls of the last allowed turn are not executed (their reply
    could never be read); the episode is truncated (it still acts)."""
    ran = []

    def counted(expression: str) -> str:
        """Echo, counted.

        Args:
            expression: anything
        """
        ran.append(expression)
        return expression

    calls = ToolCallParser(
        r"<calc>(?P<arguments>.*?)</calc>", stop="</calc>", schemas=[tool_schema(counted)]
    )
    settings = EpisodeSettings(max_turns=2, reply_template="[{content}]")
    episodes, _ = plain_episodes(
        ["<calc>2</calc>"], tools=[counted], parser=calls, settings=settings
    )
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=20))
    assert ran == ["2"] and bool(out.rollout.truncated[0])
    assert [m["role"] for m in out.completions[0]] == ["assistant", "tool", "assistant"]


def lambda_tool(expression: str) -> str:
    """Echo.

    Args:
        expression: anything
    """
    return expression


class Raising:
    def reset(self, row):
        raise KeyError("no such level")

    def step(self, message):
        return None, None, True


def test_an_environment_that_raises_names_itself_and_the_episode():
    episodes, _ = plain_episodes(["ab"], environment_factory=Raising)
    with pytest.raises(EpisodeError, match=r"Raising\.reset raised KeyError in episode 0"):
        episodes.sample([{"prompt": "x", "id": 7}], ["x"], 2, SamplingParams(max_new_tokens=2))


def test_malformed_and_failing_tool_calls_answer_the_model():
    def boom(expression: str) -> str:
        """Fail.

        Args:
            expression: anything
        """
        raise ValueError("bad input")

    parser = ToolCallParser("hermes", ["boom"], schemas=[tool_schema(boom)])
    episodes, _ = plain_episodes(
        ['<tool_call>{"name": "boom", "arguments": {"expression": "1"}}</tool_call>',
         "<tool_call>{not json</tool_call>", "bye"],
        tools=[boom], parser=parser,
    )  # fmt: skip
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=80))
    replies = [m["content"] for m in out.completions[0] if m["role"] == "tool"]
    assert "bad input" in replies[0] and replies[1].startswith("error")
    assert out.completions[0][-1]["content"] == "bye"


class OneTurn:
    """A single-turn task as an environment: the episode ends after the model's first turn."""

    def reset(self, row):
        return None

    def step(self, message):
        return None, None, True


def ids_reward(prompts, completions, completion_ids, **kwargs):
    """Depends on the token ids only, so it scores a text and a message list alike."""
    return [len(ids) / 8.0 + (sum(ids) % 5) * 0.1 for ids in completion_ids]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_a_one_turn_environment_equals_the_single_turn_path(preset, tmp_path, monkeypatch):
    import advantage.rl.step as step_module
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer
    from helpers import small_config

    captured = []
    original = step_module.compute_advantages

    def capture(inputs, *args, **kwargs):
        out = original(inputs, *args, **kwargs)
        captured.append(out.advantages.clone())
        return out

    monkeypatch.setattr(step_module, "compute_advantages", capture)
    results = []
    for name, env in [("single", None), ("episode", OneTurn)]:
        cfg = load_config(
            None, small_config(tmp_path / name, f"algorithm={preset}", "train.steps=1")
        )
        trainer = Trainer(cfg, reward_funcs=[ids_reward], environment_factory=env)
        results.append(trainer.fit().metrics[0])
    single, episode = results
    torch.testing.assert_close(captured[0], captured[1], rtol=0, atol=1e-6)
    assert abs(single["loss"] - episode["loss"]) <= 1e-6
    assert single["reward/mean"] == episode["reward/mean"]


def episode_token_check(backend_name: str) -> dict:
    """Episodes of the built-in calculator task on a real engine: the trained ids, split by the
    action mask, are each turn's sampled ids and each reply's tokens; and the trainer's log-probs
    of the trained ids equal the engine's at every model token (which holds only if they are the
    tokens the engine sampled, in the context it sampled them in)."""
    from advantage.engine.data import encode_prompt
    from advantage.engine.models import completion_logprobs, load_causal_lm
    from advantage.engine.rollout import TransformersBackend
    from advantage.tasks import builtin_model_path, get_task
    from advantage.tasks.tiny import char_tokenizer

    task = get_task("calculator")
    path = str(builtin_model_path("tiny-calculator"))
    tokenizer, policy = char_tokenizer(), load_causal_lm(path).eval()
    if backend_name == "vllm":
        from advantage.engine.rollout.vllm import VLLMBackend

        backend = VLLMBackend(path, tokenizer, max_model_len=128)
        backend.sync_weights(policy)
    else:
        backend = TransformersBackend(policy, tokenizer)
    parser = ToolCallParser(
        task.tool_call_format,
        stop=task.tool_call_stop,
        schemas=[tool_schema(t) for t in task.tools],
    )
    settings = EpisodeSettings(max_turns=3, reply_template=task.reply_template)
    episodes = Episodes(
        backend, tokenizer, lambda p: encode_prompt(tokenizer, p), settings,
        tools=task.tools, parser=parser,
    )  # fmt: skip
    rows = task.eval_rows()[:8]
    out = episodes.sample(
        rows, [r["prompt"] for r in rows], 4, SamplingParams(max_new_tokens=24, seed=0)
    )
    r = out.rollout
    with torch.no_grad():
        trainer_lp, _ = completion_logprobs(policy, r)
    gap = (trainer_lp - r.logprobs)[r.model_mask].abs().max().item()
    calls = 0
    for i, messages in enumerate(out.completions):
        ids = r.completion_ids[i][r.completion_mask[i]].tolist()
        actions = r.action_mask[i][r.completion_mask[i]].tolist()
        expected, expected_actions = [], []
        for m in messages:
            text = m["content"] if m["role"] == "assistant" else task.reply_template.format(**m)
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            if m is messages[-1] and m["role"] == "assistant" and ids[-1] == tokenizer.eos_token_id:
                piece = [*piece, tokenizer.eos_token_id]  # the final turn ends with EOS
            expected += piece
            expected_actions += [m["role"] == "assistant"] * len(piece)
            calls += m["role"] == "tool"
        assert ids == expected and actions == expected_actions, i
    return {"gap": gap, "calls": calls}


@pytest.mark.slow
def test_calculator_episodes_are_token_exact_on_transformers():
    found = episode_token_check("transformers")
    print(
        f"max |engine - trainer| log-prob on model tokens {found['gap']:.2e}; {found['calls']} tool calls"
    )
    assert found["gap"] < 1e-4 and found["calls"] > 0


def test_the_prompt_shows_a_trl_environments_methods_as_tools(tmp_path, monkeypatch):
    """TRL renders an environment's public methods in the prompt's tool list, beside `tools=`."""
    import advantage.rl.samplers as samplers
    from advantage.rl.config import load_config
    from helpers import small_config

    def calculator(expression: str) -> str:
        """Evaluate an expression.

        Args:
            expression: the arithmetic to evaluate
        """
        return expression

    rendered = []
    monkeypatch.setattr(
        samplers, "encode_prompt", lambda tok, prompt, system, limit, tools: rendered.append(tools)
    )
    cfg = load_config(None, small_config(tmp_path))
    for tools, env in [([], CounterEnv), ([calculator], CounterEnv), ([calculator], None)]:
        sampler = samplers.make_sampler(cfg, None, chat_tokenizer(), tools, env)
        sampler.encode("ab")
    names = [[s["function"]["name"] for s in tools] for tools in rendered]
    assert names == [["add"], ["calculator", "add"], ["calculator"]]


def test_an_environment_reward_may_be_async_or_any_awaitable():
    import asyncio

    from advantage.engine.environments import environment_reward

    class Later:  # an awaitable that is not a coroutine
        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return 0.25

    class Sync:
        def get_reward(self):
            return 1.0

    class Async:
        async def get_reward(self):
            await asyncio.sleep(0)
            return 0.5

    class Awaitable:
        def get_reward(self):
            return Later()

    envs = [Sync(), Async(), Awaitable()]
    assert environment_reward(None, None, envs) == [1.0, 0.5, 0.25]

    async def inside_a_running_loop():
        return environment_reward(None, None, envs)

    assert asyncio.run(inside_a_running_loop()) == [1.0, 0.5, 0.25]


def test_dapo_overlong_shaping_measures_an_episode_against_its_budget(tmp_path):
    """`rollout.max_new_tokens` is one turn's budget in episodes: DAPO's shaping there counts
    the episode's tokens after the prompt against `rollout.max_episode_tokens` (a probe's tool
    task: every episode that called its tool, 13 + 3 model tokens on a 16-token turn budget,
    got -1 although nothing was cut)."""
    from types import SimpleNamespace

    from advantage.rl.config import load_config
    from advantage.rl.sampling import overlong_lengths
    from advantage.rl.trainer import Trainer
    from helpers import small_config

    # 4 model tokens, a 3-token reply, 2 model tokens; a pad
    taken = torch.tensor([[True] * 9 + [False]])
    rollout = Rollout(
        prompt_ids=torch.ones(1, 2, dtype=torch.long), prompt_mask=torch.ones(1, 2, dtype=bool),
        completion_ids=torch.ones(1, 10, dtype=torch.long), completion_mask=taken,
        truncated=torch.tensor([False]),
        action_mask=torch.tensor([[1, 1, 1, 1, 0, 0, 0, 1, 1, 0]], dtype=bool),
    )  # fmt: skip
    budgets = SimpleNamespace(max_new_tokens=6, max_episode_tokens=40)
    run = SimpleNamespace(config=SimpleNamespace(rollout=budgets), episodic=True)
    lengths, budget = overlong_lengths(run, rollout)
    assert lengths.tolist() == [9] and budget == 40
    run.episodic = False
    lengths, budget = overlong_lengths(run, rollout)
    assert lengths.tolist() == [6] and budget == 6
    # episodes without that budget: refused before any model loads
    cfg = load_config(None, small_config(tmp_path, "algorithm=dapo"))
    with pytest.raises(ConfigError, match=r"rollout.max_episode_tokens"):
        Trainer(cfg, reward_funcs=[ids_reward], tools=[multiply])


# --- bad formats and tools fail when the sampler is built, as one line ----------------------


def untyped(x):
    """No type hints.

    Args:
        x: the value
    """
    return x


def add(amount: str) -> str:
    """A tool named like CounterEnv's method.

    Args:
        amount: how much
    """
    return amount


def test_a_reply_template_with_an_unknown_field_is_refused_when_the_sampler_is_built():
    """A probe: `rollout.reply_template='<r>{bogus}</r>'` raised a bare `KeyError: 'bogus'`
    mid-run, at the model's first tool call; a gym reply has no name, and `{name}` failed so."""
    for template, message in [
        ("<r>{bogus}</r>", r"^rollout\.reply_template: unknown field \{bogus\} in '<r>\{bogus\}"
         r"</r>'; the fields are \{role\}, \{content\}, \{name\} \(write a literal brace as"),
        ("<r>{content", r"^rollout\.reply_template: '<r>\{content' is not a format string of a "
         r"reply \(ValueError: expected '\}' before end of string\); the fields are"),
        ("<r>{0}</r>", r"^rollout\.reply_template: .*\(IndexError: "),
    ]:  # fmt: skip
        settings = EpisodeSettings(reply_template=template)
        with pytest.raises(ConfigError, match=message):
            plain_episodes(["<calc>5</calc>"], settings=settings, environment_factory=CounterEnv)
    settings = EpisodeSettings(max_turns=3, reply_template="[{name}:{role}:{content}]")
    episodes, tok = plain_episodes(["ab", "cd"], settings=settings, environment_factory=GymEnv)
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=2))
    assert tok.decode(out.rollout.completion_ids[0][out.rollout.completion_mask[0]]) == (
        "ab[:user:turn 1]cd"
    )


def test_tools_are_checked_when_the_sampler_is_built():
    """Two tools of one name (a tool and an environment's method) failed at the first call."""
    with pytest.raises(
        ConfigError,
        match=r"^rollout\.tools: two tools are named 'add' \(tool 'add' and method "
        r"'CounterEnv\.add'\); tool names must be unique",
    ):
        plain_episodes(["x"], tools=[add], environment_factory=CounterEnv)
    with pytest.raises(ConfigError, match=r"^rollout\.tools: tool 'untyped': cannot build"):
        plain_episodes(["x"], tools=[untyped])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.tool_call_format=<calc>(unclosed",
         "rollout.tool_call_format: '<calc>(unclosed' is not a valid regex (missing ), "
         "unterminated subpattern at position 6); give 'hermes' or a regex with a named group "
         "(?P<arguments>...)"),
        ("rollout.tool_call_format=<calc>(.*?)</calc>",
         "rollout.tool_call_format: '<calc>(.*?)</calc>' needs a named group (?P<arguments>...) "
         "for the call's arguments (JSON, or the one argument as text), and optionally "
         "(?P<name>...) for the tool's name"),
        ("rollout.reply_template=<r>{bogus}</r>",
         "rollout.reply_template: unknown field {bogus} in '<r>{bogus}</r>'; the fields are "
         "{role}, {content}, {name} (write a literal brace as {{ or }})"),
        ("rollout.tools=[test_episodes:untyped]",
         "rollout.tools: tool 'untyped': cannot build its JSON schema (TypeHintParsingException: "
         "Argument x is missing a type hint in function untyped); a tool needs type hints and a "
         "Google-style docstring with an 'Args:' line for every parameter"),
    ],
)  # fmt: skip
def test_bad_tool_settings_are_one_line_before_training(override, message, tmp_path, capsys,
                                                        monkeypatch):  # fmt: skip
    """Probes: the first, second and fourth were tracebacks (exit code 1), the third a bare
    KeyError once the model first called a tool."""
    from pathlib import Path

    from advantage.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main([
        "train", "model.name_or_path=builtin:tiny-random", "data.train=builtin:reverse",
        f"log.run_dir={tmp_path}", "log.progress=false", "log.tensorboard=false", "eval.size=0",
        "data.eval=null", "rollout.prompts_per_step=1", "rollout.num_generations=2",
        "rollout.max_new_tokens=4", "train.steps=1", "rollout.tools=[test_episodes:multiply]",
        override,
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message}\n", err
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing trained


def test_gym_turn_rewards_are_a_metric():
    """A probe: a gym environment's per-turn rewards went into the advantages but into no
    metric (`reward/mean` is the reward sources' scores)."""
    from advantage.engine.episode_metrics import episode_metrics

    class Paying(GymEnv):
        def step(self, message):
            reply, _, done = super().step(message)
            return reply, 0.25 * self.turn, done

    episodes, _ = plain_episodes(["ab", "cd", "ef"], environment_factory=Paying)
    out = episodes.sample([{"prompt": "x"}], ["x"], 2, SamplingParams(max_new_tokens=2))
    metrics = episode_metrics(out.rollout, out.completions)
    assert metrics["episode/env_reward"] == 0.25 + 0.5  # per episode: the sum of its turns'
    # tools: no per-turn rewards, no such metric
    episodes, _ = plain_episodes(["<calc>5</calc>", "done"], environment_factory=CounterEnv)
    out = episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=20))
    assert out.rollout.turn_rewards is None
    assert "episode/env_reward" not in episode_metrics(out.rollout, out.completions)


def test_a_gym_run_logs_its_turn_rewards(tmp_path):
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer
    from helpers import small_config

    cfg = load_config(None, small_config(tmp_path, "train.steps=1"))
    metrics = Trainer(cfg, reward_funcs=[ids_reward], environment_factory=GymEnv).fit().metrics
    assert 0.0 <= metrics[0]["episode/env_reward"] <= 1.0


def test_an_environments_reward_alone_trains_without_reward_functions(tmp_path):
    # a probe: reward.functions=[] was refused at load ("give at least one of reward.functions
    # or reward.model") although an environment's get_reward scores the episodes
    from advantage.rl.config import load_config
    from advantage.rl.rewarding import make_reward_computer
    from helpers import small_config

    cfg = load_config(None, small_config(tmp_path, "reward.functions=[]"))
    assert [s.name for s in make_reward_computer(cfg, None, CounterEnv).sources] == ["environment"]
    with pytest.raises(ConfigError, match=r"no reward: reward.functions=\[\] and neither"):
        make_reward_computer(cfg, None, GymEnv)  # per-turn rewards only: nothing scores


def test_tools_with_a_gym_environment_are_refused():
    # a probe: the tools never ran (step() got the turn) and metrics said 0 calls, no warning
    with pytest.raises(ConfigError, match=r"rollout.tools are never called with a gym "):
        plain_episodes(["ab"], environment_factory=GymEnv, tools=[CounterEnv().add])


def test_a_reset_text_past_the_context_names_the_environment():
    # a probe: a reset text longer than the model's positions left no room for a turn, and the
    # decoder failed with "UnboundLocalError: cannot access local variable 'step'"
    class HugeReset(GymEnv):
        def reset(self, row):
            return "1" * 50

    settings = EpisodeSettings(max_turns=2, reply_template="[{content}]", context=24)
    episodes, _ = plain_episodes(["ab"], environment_factory=HugeReset, settings=settings)
    with pytest.raises(EpisodeError, match=r"HugeReset.reset made the prompt \d+ tokens long in "
                       r"episode 0 \(row \{'prompt': 'x'\}\): the model's max_position_embeddings"
                       r"=24 leaves no room for a turn"):  # fmt: skip
        episodes.sample([{"prompt": "x"}], ["x"], 1, SamplingParams(max_new_tokens=4))
