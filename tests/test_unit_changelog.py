"""Stage 1's unit-state writes fail loudly: a record Kafka did not take must stop the batch's
acknowledgement (streams.worker.UnitChangelog asks librdkafka to report failed deliveries only)."""
from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from streams.worker import ChangelogWriteFailed, UnitChangelog

pytestmark = pytest.mark.kafka


def test_a_record_kafka_refuses_fails_the_flush_and_the_next_flush_starts_clean(settings):
    topic = settings.topic("units-changelog-test")
    admin = AdminClient(settings.kafka_config())
    # The broker refuses records over 1 KiB on this topic; the client would send up to 1 MiB.
    admin.create_topics([NewTopic(topic, 2, 1, config={"max.message.bytes": "1024"})])[topic].result(30)
    states: dict = {}
    changelog = UnitChangelog(settings, topic, states)
    changelog.write(0, "0\x1fexp\x1funit-1", b"state-1")
    changelog.flush()
    assert states == {"0\x1fexp\x1funit-1": b"state-1"}

    changelog.write(1, "1\x1fexp\x1funit-2", b"x" * 5000)
    changelog.write(1, "1\x1fexp\x1funit-3", b"x" * 5000)
    with pytest.raises(ChangelogWriteFailed, match="2 unit-state records were not written"):
        changelog.flush()

    changelog.write(1, "1\x1fexp\x1funit-2", None)
    changelog.flush()
    assert states == {"0\x1fexp\x1funit-1": b"state-1", "1\x1fexp\x1funit-3": b"x" * 5000}
