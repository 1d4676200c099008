"""deploy/grafana/sampler.json against what the service exports: every metric a panel's PromQL
(or a template variable) names is one a real server's /metrics serves, and every label a
`by (...)` clause or a `{...}` matcher uses is on that metric (or a label Prometheus adds to
every target: instance, job)."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sampler_client import InvalidArgumentError, SamplerClient
from sampler_service.server.app import SamplerServer, ServerConfig

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sampler.json"
#: Labels Prometheus attaches to every series it scrapes.
TARGET_LABELS = frozenset({"instance", "job"})
#: PromQL functions and aggregation operators (an identifier followed by `(`).
FUNCTIONS = frozenset("""
abs absent absent_over_time avg avg_over_time bottomk ceil changes clamp clamp_max clamp_min
count count_over_time count_values day_of_month day_of_week day_of_year days_in_month delta
deriv exp floor group histogram_avg histogram_count histogram_fraction histogram_quantile
histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase irate
label_join label_replace last_over_time limitk limit_ratio ln log10 log2 mad_over_time max
max_over_time min min_over_time minute month predict_linear present_over_time quantile
quantile_over_time rate resets round scalar sgn sort sort_by_label sort_by_label_desc sort_desc
sqrt stddev stddev_over_time stdvar stdvar_over_time sum sum_over_time time timestamp topk
vector year acos acosh asin asinh atan atanh cos cosh deg pi rad sin sinh tan tanh
""".split())
#: Keywords: binary set operators, modifiers and the clauses that take a label list.
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool", "offset", "by", "without", "on",
                      "ignoring", "group_left", "group_right", "Inf", "NaN", "inf", "nan"})
LABEL_LIST_CLAUSES = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$(?:\{[^}]*\}|\w+))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],@:])
  | (?P<space>\s+)
""", re.X)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of every token but white space; ValueError on anything else."""
    out, at = [], 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:]!r} of {expr!r}")
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
        at = match.end()
    return out


def _closing(toks: list[tuple[str, str]], start: int) -> int:
    """The index of the `)` that closes the `(` at `start`."""
    depth = 0
    for index in range(start, len(toks)):
        depth += {"(": 1, ")": -1}.get(toks[index][1], 0) if toks[index][0] == "op" else 0
        if depth == 0:
            return index
    raise ValueError("unbalanced parentheses")


def _opening(toks: list[tuple[str, str]], end: int) -> int:
    """The index of the `(` that the `)` at `end` closes."""
    depth = 0
    for index in range(end, -1, -1):
        depth += {")": 1, "(": -1}.get(toks[index][1], 0) if toks[index][0] == "op" else 0
        if depth == 0:
            return index
    raise ValueError("unbalanced parentheses")


def analyse(expr: str) -> tuple[dict[str, set[str]], list[tuple[frozenset[str], set[str]]]]:
    """({metric name: labels its `{...}` matchers use}, [(labels of a by/without clause, metric
    names of the aggregation it groups)]) of a PromQL expression. Metric names are the
    identifiers that are neither functions, keywords, label names nor inside `[...]`."""
    toks = tokens(expr)
    metrics: dict[str, set[str]] = {}
    spans: list[tuple[int, int]] = []  # token span of each metric name
    groupings: list[tuple[frozenset[str], tuple[int, int]]] = []
    index = 0
    while index < len(toks):
        kind, text = toks[index]
        following = toks[index + 1][1] if index + 1 < len(toks) else None
        if kind == "op" and text == "[":  # a range or subquery: durations and a step only
            index = next(i for i in range(index, len(toks)) if toks[i][1] == "]") + 1
            continue
        if kind == "op" and text == "{":  # matchers of a selector without a metric name
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        if kind != "ident":
            index += 1
            continue
        if text in LABEL_LIST_CLAUSES and following == "(":
            close = _closing(toks, index + 1)
            labels = frozenset(t for k, t in toks[index + 2:close] if k == "ident")
            if text in ("by", "without"):
                if toks[index - 1][1] == ")":  # sum(ARG) by (labels)
                    argument = (_opening(toks, index - 1), index - 1)
                else:                           # sum by (labels) (ARG)
                    argument = (close + 1, _closing(toks, close + 1))
                groupings.append((labels, argument))
            index = close + 1
            continue
        if following in ("(", "by", "without"):  # a call, or `sum by (...) (...)`
            assert text in FUNCTIONS, f"unknown function {text!r} in {expr!r}"
            index += 1
            continue
        if text in KEYWORDS:
            index += 1
            continue
        labels = metrics.setdefault(text, set())
        spans.append((index, text))
        index += 1
        if index < len(toks) and toks[index][1] == "{":
            close = next(i for i in range(index, len(toks)) if toks[i][1] == "}")
            labels.update(toks[i][1] for i in range(index + 1, close)
                          if toks[i][0] == "ident" and toks[i + 1][1] in ("=", "!=", "=~", "!~"))
            index = close + 1
    grouped = [(labels, {name for at, name in spans if start < at < end})
               for labels, (start, end) in groupings]
    return metrics, grouped


def test_the_tokenizer_finds_metrics_and_grouping_labels():
    metrics, grouped = analyse(
        'histogram_quantile(0.95, sum by (le, policy) (rate(a_bucket{instance=~"$x", '
        'code!="rate(b)"}[$__rate_interval]))) / on (instance) group_left '
        'sum(rate(c_total[5m] offset 1h)) by (job) + 1e3 * d')
    assert metrics == {"a_bucket": {"instance", "code"}, "c_total": set(), "d": set()}
    assert grouped == [(frozenset({"le", "policy"}), {"a_bucket"}),
                       (frozenset({"job"}), {"c_total"})]


def panel_targets(panels: list[dict]):
    """(panel title, expression) of every target of every panel, rows' panels included."""
    for panel in panels:
        yield from panel_targets(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: label names} a real server's /metrics serves after a little of
    everything: steps of an adaptive policy, on a stream too, an error, a policy reload."""
    policies = tmp_path_factory.mktemp("policies") / "policies.yaml"
    policies.write_text("policies:\n  p:\n    chain: [{top_k: {k: 6}}]\n    select: greedy\n")
    server = SamplerServer(ServerConfig(port=0, device="cpu", metrics_port=0,
                                        policies=policies, policy_reload_s=0.05))
    try:
        with SamplerClient(server.address, transport="inline", replay=False) as client:
            sequence = client.create_sequence(policy="entropix", seed=1)
            sequence.step(torch.randn(32))
            stream = client.stream()
            stream.step([sequence], torch.randn(1, 32))
            stream.close()
            with pytest.raises(InvalidArgumentError):
                sequence.step(torch.full((32,), float("nan")))
        policies.write_text("policies:\n  p:\n    chain: [{top_k: {k: 16}}]\n    select: greedy\n")
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while True:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            if "sampler_policy_reloads_total{" in text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    finally:
        server.stop(0)
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    assert "sampler_policy_reloads_total" in names, "the policy reload did not happen"
    return names


def test_the_dashboard_is_a_grafana_model_on_a_templated_prometheus(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        for source in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_panel_names_exported_metrics_and_their_labels(dashboard, exported):
    used = set()
    for title, expr in panel_targets(dashboard["panels"]):
        metrics, grouped = analyse(expr)
        assert metrics, f"{title}: no metric in {expr!r}"
        for name, labels in metrics.items():
            assert name in exported, f"{title}: {name} is not exported ({expr!r})"
            missing = labels - exported[name] - TARGET_LABELS
            assert not missing, f"{title}: {name} has no label {sorted(missing)} ({expr!r})"
        for labels, names in grouped:
            assert names, f"{title}: a grouping over no metric in {expr!r}"
            for name in names:
                missing = labels - exported[name] - TARGET_LABELS
                assert not missing, f"{title}: by {sorted(missing)}: not a label of {name}"
        used |= set(metrics)
    assert {"sampler_step_duration_seconds_bucket", "sampler_step_duration_seconds_count",
            "sampler_batch_rows_bucket", "sampler_rpc_total", "sampler_live_sequences",
            "sampler_decisions_total", "sampler_policy_reloads_total",
            "sampler_inflight_requests", "sampler_payload_bytes_total",
            "process_resident_memory_bytes", "process_cpu_seconds_total"} <= used


def test_template_variables_query_exported_metrics(dashboard, exported):
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) \
            else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"${variable['name']}: {query!r}"
        assert match.group(1) in exported
        assert match.group(2) in exported[match.group(1)] | TARGET_LABELS
