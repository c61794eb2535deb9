//! What a load run sends when its prompts matter: many users sharing a few long system prompts
//! (`shared-prefix`, SGLang's "generated shared prefix" benchmark), or conversations that resend
//! their whole history at every turn (`multi-turn`). Every prompt is made from seeded words, so a
//! run is the same from one time to the next; requests ask for streamed chat completions with
//! usage, whose `cached_tokens` say how much of each prompt the engine's prefix cache held.

use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Request `i` takes one of `prefixes` system prompts of `prefix_chars` (chosen at random),
    /// then a question of its own of `suffix_chars`.
    SharedPrefix { prefixes: usize, prefix_chars: usize, suffix_chars: usize },
    /// `sessions` conversations, taking turns: each request is the next turn of the next
    /// conversation, resending its system prompt (4,000 bytes) and every earlier question (100)
    /// and answer (300). After `turns` turns a conversation starts over with new text.
    MultiTurn { sessions: usize, turns: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub shape: Shape,
    pub model: String,
    pub max_tokens: u32,
}

/// A multi-turn conversation's system prompt (instructions and tools, as chat apps send), and
/// the size of each question and answer.
const SYSTEM_CHARS: usize = 4000;
const QUESTION_CHARS: usize = 100;
const ANSWER_CHARS: usize = 300;

const WORDS: [&str; 16] = [
    "cache", "prefix", "token", "engine", "request", "gateway", "route", "model", "stream", "queue", "block", "prompt",
    "answer", "system", "latency", "backend",
];

/// About `chars` bytes of seeded words.
fn text(seed: u64, chars: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = String::with_capacity(chars + 16);
    while out.len() < chars {
        out.push_str(WORDS[rng.usize(..WORDS.len())]);
        out.push(' ');
    }
    out.truncate(chars);
    out
}

impl Workload {
    /// The body of request `i`, and the turn it is (1 for the first; `None` outside multi-turn).
    pub fn request(&self, i: usize) -> (Bytes, Option<u32>) {
        let (messages, turn) = match self.shape {
            Shape::SharedPrefix { prefixes, prefix_chars, suffix_chars } => {
                let p = fastrand::Rng::with_seed(i as u64).usize(..prefixes.max(1));
                let system = text(1 + p as u64, prefix_chars);
                let question = text((i as u64).wrapping_add(1_000_000), suffix_chars);
                (vec![json!({"role": "system", "content": system}), json!({"role": "user", "content": question})], None)
            }
            Shape::MultiTurn { sessions, turns } => {
                let (s, round) = (i % sessions.max(1), i / sessions.max(1));
                let (t, generation) = (round % turns.max(1), round / turns.max(1));
                let seed = ((generation as u64) << 32 | s as u64).wrapping_mul(1000);
                let mut messages = vec![json!({"role": "system", "content": text(seed, SYSTEM_CHARS)})];
                for k in 0..=t as u64 {
                    messages
                        .push(json!({"role": "user", "content": text(seed.wrapping_add(1 + 2 * k), QUESTION_CHARS)}));
                    if k < t as u64 {
                        messages.push(
                            json!({"role": "assistant", "content": text(seed.wrapping_add(2 + 2 * k), ANSWER_CHARS)}),
                        );
                    }
                }
                (messages, Some(t as u32 + 1))
            }
        };
        let body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        (Bytes::from(body.to_string()), turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(body: &Bytes) -> Vec<serde_json::Value> {
        serde_json::from_slice::<serde_json::Value>(body).unwrap()["messages"].as_array().unwrap().clone()
    }

    #[test]
    fn shared_prefix_requests_reuse_a_few_long_system_prompts() {
        let w = Workload {
            shape: Shape::SharedPrefix { prefixes: 4, prefix_chars: 800, suffix_chars: 50 },
            model: "m".into(),
            max_tokens: 8,
        };
        let systems: std::collections::HashSet<String> =
            (0..200).map(|i| messages(&w.request(i).0)[0]["content"].as_str().unwrap().to_string()).collect();
        assert_eq!(systems.len(), 4);
        assert!(systems.iter().all(|s| s.len() == 800));
        assert_eq!(w.request(7), w.request(7), "the same run every time");
        assert_ne!(messages(&w.request(1).0)[1], messages(&w.request(2).0)[1], "each question its own");
    }

    #[test]
    fn each_turn_resends_the_conversation_so_far() {
        let w = Workload { shape: Shape::MultiTurn { sessions: 3, turns: 4 }, model: "m".into(), max_tokens: 8 };
        let (first, t1) = w.request(1);
        let (second, t2) = w.request(4);
        assert_eq!((t1, t2), (Some(1), Some(2)));
        let (a, b) = (messages(&first), messages(&second));
        assert_eq!(b.len(), a.len() + 2, "an answer and a new question");
        assert_eq!(b[..a.len()], a[..], "the same session, the same history");
        assert_eq!(w.request(1 + 3 * 4).1, Some(1), "after the last turn, a new conversation");
        assert_ne!(messages(&w.request(1 + 3 * 4).0)[0], a[0]);
        // However long a run goes, a request index never overflows the seeds.
        let one = Workload { shape: Shape::MultiTurn { sessions: 1, turns: 1 }, model: "m".into(), max_tokens: 1 };
        assert_eq!(one.request(usize::MAX).1, Some(1));
        let shared = Shape::SharedPrefix { prefixes: 1, prefix_chars: 10, suffix_chars: 10 };
        assert!(Workload { shape: shared, ..one }.request(usize::MAX).1.is_none());
    }
}
