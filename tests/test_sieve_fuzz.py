"""Hypothesis: generated scripts never crash the compiler or the interpreter, and never exceed the limits
unnoticed (issue 17 §4).

Two generators: arbitrary text (the compiler must answer with a :class:`SieveError` or a script, nothing
else) and well-formed scripts from Sieve's grammar with every extension (the interpreter must return a
:class:`Result`; an evaluation that needs N instructions must fail with the limit named when only N-1 are
allowed, and a slow clock must trip the time limit).
"""

from __future__ import annotations

from itertools import count

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postgate.inbound.filters import split_message
from postgate.policy.sieve import CAPABILITIES, Input, Limits, SieveError, compile_script, run

REQUIRE = "require [" + ", ".join(f'"{c}"' for c in sorted(CAPABILITIES)) + "];\n"

MESSAGE = (b"From: Alice <alice+x@example.com>\r\nTo: b@example.org, c@example.net\r\nSubject: Hello *?\\\r\n"
           b"Date: Tue, 01 Dec 2026 23:15:42 +0100\r\nX-Spam-Score: 5\r\n\r\nbody text ${1}\r\n")

words = st.sampled_from(["", "*", "?", "a*b?c", "\\\\*", "${1}", "${v}", "${0}x${9}", "example.com", "Hello",
                         "from", "to", "subject", "x-spam-score", "date", "1", "10", "gt", "-0100", "+0900",
                         "a@b.example", "${unknown.ns}", "ÄÖ", "\\\"q\\\""])


def q(s: str) -> str:
    return '"' + s + '"'


strings = words.map(q)
string_lists = st.one_of(strings, st.lists(words, min_size=1, max_size=3).map(
    lambda xs: "[" + ", ".join(q(x) for x in xs) + "]"))
match = st.sampled_from(["", ":is", ":contains", ":matches", ':value "ge"', ':count "lt"', ':value "ne"', ":list"])
comparator = st.sampled_from(["", ':comparator "i;octet"', ':comparator "i;ascii-casemap"',
                              ':comparator "i;ascii-numeric"'])
addrpart = st.sampled_from(["", ":all", ":localpart", ":domain", ":user", ":detail"])
index = st.sampled_from(["", ":index 1", ":index 2 :last"])
datepart = st.sampled_from(["year", "month", "date", "julian", "time", "iso8601", "std11", "zone", "weekday"])


def leaf_tests() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just("true"), st.just("false"),
        st.builds(lambda m, c, i, h, k: f"header {m} {c} {i} {h} {k}", match, comparator, index, string_lists,
                  string_lists),
        st.builds(lambda m, a, h, k: f"address {m} {a} {h} {k}", match, addrpart, string_lists, string_lists),
        st.builds(lambda m, a, k: f'envelope {m} {a} ["from","to"] {k}', match, addrpart, string_lists),
        st.builds(lambda h: f"exists {h}", string_lists),
        st.builds(lambda o, n: f"size {o} {n}", st.sampled_from([":over", ":under"]),
                  st.integers(0, 10**6)),
        st.builds(lambda m, s, k: f"string {m} {s} {k}", match, string_lists, string_lists),
        st.builds(lambda m, k: f"body {m} :text {k}", match, string_lists),
        st.builds(lambda m, k: f'environment {m} "remote-ip" {k}', match, string_lists),
        st.builds(lambda m, z, p, k: f'date {m} {z} "date" "{p}" {k}', match,
                  st.sampled_from(["", ':zone "+0100"', ":originalzone"]), datepart, string_lists),
        st.builds(lambda m, p, k: f'currentdate {m} "{p}" {k}', match, datepart, string_lists),
        st.builds(lambda m, k: f"spamtest {m} {k}", match, strings),
        st.builds(lambda k: f"valid_ext_list {k}", string_lists),
    )


tests = st.recursive(leaf_tests(), lambda inner: st.one_of(
    inner.map(lambda t: f"not {t}"),
    st.lists(inner, min_size=1, max_size=3).map(lambda ts: "allof (" + ", ".join(ts) + ")"),
    st.lists(inner, min_size=1, max_size=3).map(lambda ts: "anyof (" + ", ".join(ts) + ")")), max_leaves=8)

simple_commands = st.one_of(
    st.sampled_from(["keep;", "discard;", "stop;", 'redirect "r@x.example";', 'redirect :copy "s@x.example";',
                     'fileinto "F";', 'fileinto :copy "${1}";', 'reject "no";', 'ereject "no";',
                     'addheader "X-A" "${v}";', 'addheader :last "X-B" "b";', 'deleteheader "subject";',
                     'deleteheader :index 1 :matches "to" "*";', 'tls_policy "dane-only";',
                     'route :recipients "example.org" "smtp:[r.example]";', 'hold;', 'defer "later";',
                     'dkim_sign :selector "s" "example.com";', "queue_priority 5;", "queue_lifetime 600;"]),
    st.builds(lambda mod, v: f'set {mod} "v" {v};', st.sampled_from(["", ":lower", ":upper :length",
                                                                     ":quotewildcard", ":upperfirst"]), strings),
)


def blocks(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda t, a, e: f"if {t} {{ {a} }}" + (f" else {{ {e} }}" if e else ""), tests, inner,
                     st.one_of(st.just(""), inner))


commands = st.recursive(simple_commands, lambda inner: st.one_of(
    blocks(inner), st.lists(inner, min_size=1, max_size=4).map(" ".join)), max_leaves=12)
scripts = st.lists(commands, min_size=0, max_size=6).map(lambda cs: REQUIRE + "\n".join(cs))

STAGES = ["connect", "ehlo", "mail", "rcpt", "data"]


def make_input(stage: str) -> Input:
    headers, body = split_message(MESSAGE) if stage == "data" else (None, None)
    return Input(stage, "alice@example.com" if stage in ("mail", "rcpt", "data") else None,
                 ["b@example.org"] if stage in ("rcpt", "data") else [], headers, body, len(MESSAGE),
                 {"remote-ip": "192.0.2.1"}, spam_score=5.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes_the_compiler(text: str) -> None:
    try:
        compile_script(text, "fuzz")
    except SieveError as e:
        assert str(e).startswith("fuzz:") and e.line >= 1 and e.col >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list('if{}()[],;:"\\#/*\n text:.0Kabc')), max_size=200))
def test_sieve_shaped_text_never_crashes_the_compiler(text: str) -> None:
    try:
        compile_script(REQUIRE + text, "fuzz")
    except SieveError as e:
        assert str(e).startswith("fuzz:")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts, st.sampled_from(STAGES))
def test_generated_scripts_never_crash_and_limits_are_noticed(text: str, stage: str) -> None:
    try:
        script = compile_script(text, "gen")
    except SieveError as e:
        # the generator can combine tags that are refused at compile time (e.g. :contains with
        # i;ascii-numeric, :count with addheader): those must be reported with a position
        assert e.line >= 1
        return
    full = run(script, make_input(stage), Limits(max_instructions=10**6, max_seconds=60))
    assert full.error is None or "limit" not in full.error
    assert not (full.error or "").startswith("internal error"), full.error
    n = full.instructions
    # the same evaluation with one instruction less must stop, and say so
    if n > 1 and full.error is None:
        short = run(script, make_input(stage), Limits(max_instructions=n - 1, max_seconds=60))
        assert short.error is not None and "instruction limit" in short.error
    # a clock that advances 10 ms per reading trips a 50 ms time limit on anything longer than a few steps
    ticks = count()
    slow = run(script, make_input(stage), Limits(max_seconds=0.05), clock=lambda: next(ticks) * 0.01)
    if n > 6:
        assert slow.error is not None and ("time limit" in slow.error or full.error is not None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts, st.sampled_from(STAGES))
def test_generated_scripts_through_the_adapter_give_well_formed_verdicts(text: str, stage: str) -> None:
    """Whatever a script does, the smtpd gets a verdict it can act on: a 5xx with reject, a 4xx with
    tempfail, recipients only at rcpt/data, never an exception."""
    import tempfile
    from pathlib import Path

    from postgate.inbound.filters import Action, Stage, StageContext
    from postgate.inbound.sieve_filter import SieveScripts, SieveSettings, evaluate

    try:
        compile_script(text, "gen")
    except SieveError:
        return
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "s.sieve"
        f.write_text(text)
        holder = SieveScripts(SieveSettings(script=str(f), hostname="mx.example"))
        st_ = {"connect": Stage.CONNECT, "ehlo": Stage.HELO, "mail": Stage.MAIL, "rcpt": Stage.RCPT,
               "data": Stage.DATA}[stage]
        ctx = StageContext(st_, "mx", "192.0.2.1", helo="c.example", sender="alice@example.com",
                           recipient="b@example.org" if st_ is Stage.RCPT else None,
                           recipients=["b@example.org", "c@example.net"] if st_ is Stage.DATA else [],
                           message=MESSAGE if st_ is Stage.DATA else None)
        v = evaluate(holder, ctx)
    if v.action is Action.REJECT:
        assert v.reply is not None and 500 <= v.reply.code < 600
    elif v.action is Action.TEMPFAIL:
        assert v.reply is not None and 400 <= v.reply.code < 500
    else:
        assert v.reply is None
    if st_ not in (Stage.RCPT, Stage.DATA):
        assert not v.add_recipients and not v.remove_recipients
