//! An optional external prompt-injection classifier, after commit: each
//! message sent or edited is also sent to an HTTP endpoint (Hugging Face
//! text-embeddings-inference's `POST /predict`, serving a sequence
//! classifier such as a prompt-injection model; see
//! [`natter_llm::classifier`], which reads a long text in overlapping
//! windows), and a verdict worse than the stored one raises the message's
//! flags as a change of its chat (`message_edited`, replayed on resume). It
//! can only raise: a classifier that disagrees with natter-detect never
//! clears a flag. Failures are logged and leave the message as it is.

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
    classifier: natter_llm::classifier::Classifier,
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
        let classifier = natter_llm::classifier::Classifier::new(base_url, timeout)
            .map_err(|e| anyhow::anyhow!("--classifier-url: {e}"))?;
        Ok(Self {
            classifier,
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
        let verdict = self.classifier.classify(text).await?;
        if !verdict.complete {
            tracing::warn!(message_id = %id, bytes = text.len(), "a message longer than the classifier reads: its end not classified");
        }
        let score = verdict.score;
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
