import pytest
from conftest import agent_transcript
from tiny import make_tokenizer

from interp import positions as P
from interp.positions import PositionError
from interp.transcripts import Transcript, render


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("llama3", tmp_path_factory.mktemp("tok"))


def positions_of(sel, r):
    return [p.positions for p in sel(r)]


def test_decision_is_the_end_of_the_generation_prompt(tok):
    r = render(agent_transcript(0), tok)
    assert positions_of(P.decision(), r) == [(len(r) - 1,)]
    assert r.kinds[-1] == "template" and r.message[-1] == len(r.transcript.messages)


def test_decision_is_the_last_prefix_token_when_a_prefix_is_forced(tok):
    r = render(agent_transcript(0, prefix="I will check."), tok)
    (pick,) = P.decision()(r)
    assert pick.position == r.positions("prefix")[-1] == len(r) - 1


def test_decision_in_a_finished_reply_is_just_before_its_first_written_token(tok):
    t = Transcript.from_messages([{"role": "user", "content": "Delete the temp cache"},
                                  {"role": "assistant", "content": "Sure."}])
    r = render(t, tok)
    (pick,) = P.decision()(r)
    assert r.kinds[pick.position] == "template" and r.kinds[pick.position + 1] == "assistant"


def test_last_mean_every_pick_the_segment(tok):
    r = render(agent_transcript(1, prefix="As a careful agent"), tok)
    user = r.positions("user").tolist()
    assert positions_of(P.last("user"), r) == [(user[-1],)]
    assert positions_of(P.mean("user"), r) == [tuple(user)]
    prefix = r.positions("prefix").tolist()
    assert positions_of(P.every("prefix"), r) == [(p,) for p in prefix]
    assert len(P.all_tokens()(r)) == len(r)


def test_selectors_compose_in_order(tok):
    r = render(agent_transcript(1, prefix="As a careful agent"), tok)
    sel = P.last("user") + P.decision() + P.at(0, -2)
    assert [p.selector for p in sel(r)] == [P.last("user"), P.decision(), P.at(0, -2), P.at(0, -2)]
    assert [p.position for p in sel(r)][2:] == [0, len(r) - 2]


def test_names_parse_back_to_the_same_selector():
    for name in ["decision", "all", "last:tool_call", "mean:system+every:prefix", "at:-1,3+decision"]:
        assert P.parse(name).name == name


def test_bad_selector_names_are_explained():
    with pytest.raises(ValueError, match="unknown position selector 'first:user'"):
        P.parse("first:user")
    with pytest.raises(ValueError, match="unknown segment kind 'tools'"):
        P.parse("last:tools")


def test_a_selector_matching_nothing_names_the_transcript(tok):
    r = render(agent_transcript(0), tok)
    with pytest.raises(PositionError, match="'every:prefix' matches no token in transcript 'agent-0'"):
        P.every("prefix")(r)
    with pytest.raises(PositionError, match="position 9999 is outside transcript"):
        P.at(9999)(r)
