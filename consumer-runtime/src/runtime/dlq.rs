//! The dead-letter path: a record the handler cannot process goes to `<topic>.dlq` with the reason.

use super::*;

impl<H: Handler> Runtime<H> {
    /// Publishes the original record to `<topic>.dlq` with `dlq.*` headers and waits for the ack.
    pub(super) async fn dead_letter(
        &self,
        m: &BorrowedMessage<'_>,
        reason: &str,
        attempts: u32,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let extra = [
            ("dlq.reason", reason.to_owned()),
            ("dlq.group", self.cfg.group_id.clone()),
            ("dlq.attempts", attempts.to_string()),
            ("dlq.original_partition", m.partition().to_string()),
            ("dlq.original_offset", m.offset().to_string()),
        ];
        for (k, v) in &extra {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let topic = format!("{}.dlq", m.topic());
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        record.key = m.key();
        record.payload = m.payload();
        self.dlq
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}
