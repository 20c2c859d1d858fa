"""Tracing configuration from the standard OTEL_* variables: when it is on, which sampler, what is refused."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import Link, SpanContext, TraceFlags

from producer.amqp.tracing import ConfigError, extract_context, sampler_from_env, tracing_requested
from worker.tracing import LinkedSampler


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_configured(env: dict[str, str], on: bool) -> None:
    assert tracing_requested(env) is on


def test_the_default_sampler_follows_the_parent_and_samples_roots() -> None:
    assert sampler_from_env({}).get_description() == sampling.ParentBased(sampling.ALWAYS_ON).get_description()


def test_a_ratio_sampler_reads_its_argument() -> None:
    sampler = sampler_from_env({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    assert "0.01" in sampler.get_description()
    assert sampler.get_description().startswith("ParentBased")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ],
)
def test_a_bad_sampler_is_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        sampler_from_env(env)


def test_a_root_span_linked_to_a_sampled_request_is_sampled_whatever_the_ratio() -> None:
    sampler = LinkedSampler(sampling.ParentBased(sampling.TraceIdRatioBased(0.0)))
    sampled = SpanContext(trace_id=1, span_id=2, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    not_sampled = SpanContext(trace_id=3, span_id=4, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    assert sampler.should_sample(None, 5, "run", links=[Link(not_sampled), Link(sampled)]).decision.is_sampled()
    assert not sampler.should_sample(None, 5, "run", links=[Link(not_sampled)]).decision.is_sampled()
    assert not sampler.should_sample(None, 5, "run").decision.is_sampled()


def test_trace_context_is_read_from_string_or_byte_headers() -> None:
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for value in (header, header.encode()):
        context = extract_context({"traceparent": value})
        assert context is not None
    assert extract_context({"x-published-ms": 1}) is None
    assert extract_context(None) is None
