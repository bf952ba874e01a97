"""The stage-hook chain (inbound/filters.py): how verdicts compose, and milter-style header edits."""

from __future__ import annotations

import asyncio

from postgate.inbound.filters import (
    Action,
    FilterChain,
    HeaderEdit,
    HeaderOp,
    Stage,
    StageContext,
    Verdict,
    apply_header_edits,
    split_message,
)
from postgate.policy.vocab import Reply

MSG = b"From: a@x\r\nSubject: hi\r\n there\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody\r\n"


class Fixed:
    def __init__(self, name: str, verdicts: list[Verdict] | Exception, default: Action = Action.ACCEPT) -> None:
        self.name, self.verdicts, self.default_action = name, verdicts, default
        self.calls = 0
        self.closed = 0

    def session(self) -> Fixed:
        return self

    async def on(self, ctx: StageContext) -> Verdict:
        self.calls += 1
        if isinstance(self.verdicts, Exception):
            raise self.verdicts
        return self.verdicts.pop(0) if self.verdicts else Verdict()

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        self.closed += 1


def ctx(stage: Stage = Stage.RCPT) -> StageContext:
    return StageContext(stage, "mx", "192.0.2.1")


def test_split_keeps_folding_and_body() -> None:
    headers, body = split_message(MSG)
    assert headers == [("From", " a@x"), ("Subject", " hi\r\n there"), ("X-A", " 1"), ("X-A", " 2")]
    assert body == b"body\r\n"


def test_header_edits_like_libmilter() -> None:
    out = apply_header_edits(MSG, [HeaderEdit(HeaderOp.ADD, "X-Spam", "yes"),
                                   HeaderEdit(HeaderOp.INSERT, "Authentication-Results", "mx; dkim=pass", 0),
                                   HeaderEdit(HeaderOp.CHANGE, "X-A", "two", 2),
                                   HeaderEdit(HeaderOp.DELETE, "Subject")])
    assert out == (b"Authentication-Results: mx; dkim=pass\r\nFrom: a@x\r\nX-A: 1\r\nX-A: two\r\n"
                   b"X-Spam: yes\r\n\r\nbody\r\n")
    assert apply_header_edits(MSG, [], b"new\r\n").endswith(b"\r\n\r\nnew\r\n")


def test_reject_stops_the_chain_and_gets_a_default_reply() -> None:
    a, b, c = Fixed("a", [Verdict(Action.ACCEPT)]), Fixed("b", [Verdict(Action.REJECT)]), Fixed("c", [])
    out = asyncio.run(FilterChain([a, b, c]).on(ctx()))
    assert out.verdict.action is Action.REJECT and out.verdict.filter == "b"
    assert out.verdict.reply == Reply(550, "5.7.1", "Command rejected")
    assert c.calls == 0


def test_accept_is_no_excuse_for_the_next_filter() -> None:
    a = Fixed("a", [Verdict(Action.ACCEPT)])
    b = Fixed("b", [Verdict(), Verdict(Action.TEMPFAIL, Reply(450, "4.2.0", "greylisted"))])
    chain = FilterChain([a, b])
    assert asyncio.run(chain.on(ctx())).verdict.action is Action.CONTINUE
    out = asyncio.run(chain.on(ctx()))
    assert out.verdict.reply == Reply(450, "4.2.0", "greylisted")
    assert a.calls == 1   # accepted: not asked again in this transaction


def test_failed_filter_applies_its_default_for_the_rest_of_the_session() -> None:
    broken = Fixed("m", RuntimeError("garbage"), default=Action.TEMPFAIL)
    chain = FilterChain([broken])
    for _ in range(2):
        out = asyncio.run(chain.on(ctx()))
        assert out.verdict.action is Action.TEMPFAIL and out.verdict.reply is not None
        assert out.verdict.reply.code == 451
    assert broken.calls == 1 and broken.closed == 1
    ok = FilterChain([Fixed("m", RuntimeError("down"), default=Action.ACCEPT)])
    assert asyncio.run(ok.on(ctx())).verdict.action is Action.CONTINUE


def test_hold_and_edits_accumulate() -> None:
    a = Fixed("a", [Verdict(Action.HOLD, quarantine_reason="spam?")])
    b = Fixed("b", [Verdict(headers=(HeaderEdit(HeaderOp.ADD, "X-B", "1"),))])
    out = asyncio.run(FilterChain([a, b]).on(ctx(Stage.DATA)))
    assert out.hold is not None and out.hold.filter == "a"
    assert [v.filter for v in out.edits] == ["b"]
    assert out.verdict.action is Action.CONTINUE
