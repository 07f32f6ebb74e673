//! The test bed's Kafka broker is real: produce, consume in a consumer group,
//! commit, and read the committed offset back as a fresh group member would.
//! The topic and the group are deleted when the test ends, failed or not.

use crate::common;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[tokio::test]
async fn produce_consume_commit_round_trip() {
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique_name("testbed-roundtrip");
    let group = common::unique_name("testbed-group");
    // Dropped last: after the consumers, so the group is empty by then.
    let _owned = common::TempTopics {
        bootstrap: bootstrap.clone(),
        topics: vec![topic.clone()],
        groups: vec![group.clone()],
    };

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin client");
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");

    let producer = common::test_producer(&bootstrap);
    for i in 0..3 {
        let payload = format!("{{\"n\":{i}}}");
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .expect("delivery");
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a message within 30 s")
            .expect("consume");
        seen.push(String::from_utf8_lossy(msg.payload().unwrap()).to_string());
        consumer
            .commit_message(&msg, CommitMode::Sync)
            .expect("commit");
    }
    assert_eq!(seen, vec![r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#]);
    drop(consumer);

    // A fresh member of the same group sees offset 3 committed.
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .create()
        .expect("second consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let offset = committed
        .find_partition(&topic, 0)
        .expect("partition 0")
        .offset();
    assert_eq!(offset, Offset::Offset(3));
}
