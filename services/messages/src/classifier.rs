//! An optional external prompt-injection classifier, after commit: each
//! message sent or edited is also sent to an HTTP endpoint (Hugging Face
//! text-embeddings-inference's `POST /predict`, serving a sequence
//! classifier such as a prompt-injection model), and a verdict worse than
//! the stored one raises the message's flags as a change of its chat
//! (`message_edited`, replayed on resume). It can only raise: a classifier
//! that disagrees with natter-detect never clears a flag. Failures are
//! logged and leave the message as it is.

use std::sync::Arc;
use std::time::Duration;

use natter_bus::{Event as BusEvent, EventBus, Topic};
use natter_kit::id::{ChatId, MessageId};
use tokio::sync::Semaphore;

use crate::grpc;
use crate::store::{Flags, MessageStore};

/// The detector name stored with a classifier's verdict.
pub const CLASSIFIER_DETECTOR: &str = "classifier";

/// Classifications running at once; more are skipped (logged), so a slow
/// classifier never piles up work.
const IN_FLIGHT: usize = 64;

/// The classifier and what it writes to.
pub struct Classifier {
    http: reqwest::Client,
    url: String,
    store: Arc<dyn MessageStore>,
    bus: Arc<dyn EventBus>,
    in_flight: Arc<Semaphore>,
    thresholds: natter_detect::Thresholds,
}

impl Classifier {
    /// A classifier at `base_url` (`/predict` is appended), each call
    /// bounded by `timeout`.
    ///
    /// Errors: the URL is not http(s).
    pub fn new(
        base_url: &str,
        timeout: Duration,
        store: Arc<dyn MessageStore>,
        bus: Arc<dyn EventBus>,
    ) -> anyhow::Result<Self> {
        let base = base_url.trim_end_matches('/');
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--classifier-url {base:?}: not an http(s) URL"
        );
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            http,
            url: format!("{base}/predict"),
            store,
            bus,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            thresholds: natter_detect::Thresholds::default(),
        })
    }

    /// Classifies revision `revision` of a message in the background.
    pub fn spawn(self: &Arc<Self>, id: MessageId, chat: ChatId, revision: i64, text: String) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(message_id = %id, "external classifier busy: message not classified");
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = this.classify(id, chat, revision, &text).await {
                tracing::warn!(message_id = %id, error = %e, "external classifier failed");
            }
        });
    }

    async fn classify(&self, id: MessageId, chat: ChatId, revision: i64, text: &str) -> anyhow::Result<()> {
        let response = self.http.post(&self.url).json(&serde_json::json!({ "inputs": text })).send().await?;
        anyhow::ensure!(response.status().is_success(), "HTTP {}", response.status());
        let score = injection_score(&response.json::<serde_json::Value>().await?);
        let severity = self.thresholds.severity(score);
        if severity == natter_detect::Severity::None {
            return Ok(());
        }
        let flags = Flags::of_score(
            Flags::severity_of(severity),
            score,
            vec!["instruction_override".into()],
            CLASSIFIER_DETECTOR,
        );
        if let Some(mut raised) = self.store.raise_flags(id, revision, &flags).await? {
            let store = self.store.as_ref();
            crate::service::with_reactions(store, std::slice::from_mut(&mut raised), None).await?;
            let event = grpc::edited_event(raised);
            self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
        }
        Ok(())
    }
}

/// The injection probability in a `/predict` answer: a list of `{label,
/// score}` (or a list of such lists, one per input), the score of the first
/// label that names an injection (`injection`, `jailbreak`, `unsafe`,
/// `malicious`, `label_1`, any case); 0 when none does.
pub fn injection_score(answer: &serde_json::Value) -> f32 {
    let labels = match answer.as_array() {
        Some(outer) if outer.first().is_some_and(serde_json::Value::is_array) => outer[0].as_array(),
        other => other,
    };
    labels
        .into_iter()
        .flatten()
        .find(|l| {
            let label = l["label"].as_str().unwrap_or_default().to_lowercase();
            ["injection", "jailbreak", "unsafe", "malicious", "label_1"].iter().any(|k| label.contains(k))
        })
        .and_then(|l| l["score"].as_f64())
        .map_or(0.0, |s| s as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_injection_label_s_score_is_read_from_either_shape() {
        let flat = serde_json::json!([{"label": "SAFE", "score": 0.1}, {"label": "INJECTION", "score": 0.9}]);
        assert!((injection_score(&flat) - 0.9).abs() < 1e-6);
        let nested = serde_json::json!([[{"label": "jailbreak", "score": 0.75}]]);
        assert!((injection_score(&nested) - 0.75).abs() < 1e-6);
        assert_eq!(injection_score(&serde_json::json!([{"label": "SAFE", "score": 0.99}])), 0.0);
        assert_eq!(injection_score(&serde_json::json!({"error": "busy"})), 0.0);
    }
}
