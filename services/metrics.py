"""Prometheus metrics: what the operator watches, defined once and served at ``/metrics``.

Each process exports the metrics of the services it runs; the names say which service counts.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Seconds from an article being fetched to an alert about it being delivered.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)

ARTICLES_FETCHED = Counter(
    "newsmon_articles_fetched_total", "New articles published by ingest", ["feed"]
)
FEED_POLLS = Counter(
    "newsmon_feed_polls_total", "Feed polls by outcome (ok, not_modified, error)", ["outcome"]
)
FEED_ERRORS = Counter("newsmon_feed_errors_total", "Failed feed polls", ["feed"])
ITEMS_SKIPPED = Counter(
    "newsmon_feed_items_skipped_total",
    "Feed items that could not become articles, by reason (no title or text, …)",
    ["reason"],
)
ARTICLES_CLASSIFIED = Counter("newsmon_articles_classified_total", "Articles scored by classify")
ARTICLES_MATCHED = Counter("newsmon_articles_matched_total", "Article-topic matches", ["topic"])
LABELS = Counter(
    "newsmon_labels_total", "Labels given to topics, by where they came from", ["topic", "source"]
)
DELIVERIES = Counter(
    "newsmon_deliveries_total",
    "Delivery attempts by channel and outcome (delivered, retry, dead)",
    ["channel", "outcome"],
)
END_TO_END = Histogram(
    "newsmon_end_to_end_seconds",
    "From an article's fetch to the delivery of an alert about it",
    ["channel"],
    buckets=_LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "newsmon_consumer_lag",
    "Messages not yet consumed, per consumer group and topic",
    ["group", "topic"],
)


def record_lag(group: str, lag: dict[str, int]) -> None:
    for topic, messages in lag.items():
        CONSUMER_LAG.labels(group, topic).set(messages)


def exposition() -> tuple[bytes, str]:
    """The current metrics in Prometheus' text format, with its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
