//! The routing key of an inference request: its whole prompt as the engine will see it, cut into
//! blocks of `block_chars` bytes and hashed as a chain (each block's hash covers every block
//! before it), so two prompts share the hashes of exactly the blocks of their common prefix.
//!
//! The prompt is what decides the engine's prefix cache: for chat, the tool definitions and every
//! message in order (role and content, earlier assistant turns included: a multi-turn
//! conversation resends them, and their blocks are still cached where the conversation was
//! served); for completions, `prompt`. The model is in the first hash, so the same text for two
//! models (or two adapters) never matches. The mock engine keys its cache model the same way.
//!
//! Pure: bytes in, hashes out; no allocation beyond the block buffer and the hash list.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A prompt's chained block hashes; the last block may be partial.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptKey {
    pub blocks: Vec<u64>,
    /// How many of `blocks` are full (an engine caches only whole blocks).
    pub full: usize,
    /// The prompt text's length in bytes.
    pub bytes: usize,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

/// The key of an OpenAI-style request body (`messages` or `prompt`), or `None` when the body is
/// not such a JSON object. `block_chars` must be at least 1.
pub fn key_of(body: &[u8], block_chars: usize) -> Option<PromptKey> {
    let req: Request = serde_json::from_slice(body).ok()?;
    let mut chain = Chain::new(block_chars, req.model.as_deref().unwrap_or(""));
    if let Some(tools) = req.tools {
        chain.feed(tools.get().as_bytes());
    }
    match (&req.messages, req.prompt) {
        (Some(messages), _) => {
            for m in messages {
                chain.feed(m.role.as_deref().unwrap_or("").as_bytes());
                chain.feed(b"\n");
                if let Some(content) = m.content {
                    chain.feed_json(content);
                }
                if let Some(calls) = m.tool_calls {
                    chain.feed(calls.get().as_bytes());
                }
                chain.feed(b"\n");
            }
        }
        (None, Some(prompt)) => chain.feed_json(prompt),
        (None, None) => return None,
    }
    Some(chain.finish())
}

/// Cuts a text fed piece by piece into blocks and hashes them as a chain.
struct Chain {
    size: usize,
    buf: Vec<u8>,
    prev: u64,
    key: PromptKey,
}

impl Chain {
    fn new(size: usize, model: &str) -> Self {
        let size = size.max(1);
        let seed = hash_block(0x9e37_79b9_7f4a_7c15, model.as_bytes());
        Chain { size, buf: Vec::with_capacity(size), prev: seed, key: PromptKey::default() }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        self.key.bytes += bytes.len();
        while !bytes.is_empty() {
            if self.buf.is_empty() && bytes.len() >= self.size {
                // A whole block in one piece: hashed where it lies, not copied.
                let (block, rest) = bytes.split_at(self.size);
                self.prev = hash_block(self.prev, block);
                self.key.blocks.push(self.prev);
                self.key.full += 1;
                bytes = rest;
                continue;
            }
            let take = (self.size - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == self.size {
                self.emit();
                self.key.full += 1;
            }
        }
    }

    /// A JSON string's text; anything else (an array of content parts, token ids) as written.
    fn feed_json(&mut self, raw: &RawValue) {
        let text = raw.get();
        let quoted = text.len() >= 2 && text.starts_with('"') && text.ends_with('"');
        if quoted && memchr::memchr(b'\\', text.as_bytes()).is_none() {
            // No escapes (the parser has checked it is a string): its text is what is quoted.
            return self.feed(&text.as_bytes()[1..text.len() - 1]);
        }
        match quoted.then(|| serde_json::from_str::<Cow<str>>(text).ok()).flatten() {
            Some(s) => self.feed(s.as_bytes()),
            None => self.feed(text.as_bytes()),
        }
    }

    fn emit(&mut self) {
        self.prev = hash_block(self.prev, &self.buf);
        self.key.blocks.push(self.prev);
        self.buf.clear();
    }

    fn finish(mut self) -> PromptKey {
        if !self.buf.is_empty() {
            self.emit();
        }
        self.key
    }
}

/// A plain hash of `data` (a session id), with the same function as the blocks.
pub fn hash(data: &[u8]) -> u64 {
    hash_block(0x243f_6a88_85a3_08d3, data)
}

/// A block's hash, chained on `seed`: eight bytes per multiply, then a full avalanche
/// (splitmix64's finaliser). Not cryptographic: a collision only costs a cache miss.
fn hash_block(seed: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9fb2_1c65_1e98_df25;
    let mut h = seed ^ (data.len() as u64).wrapping_mul(K);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(K).rotate_left(29);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(word) ^ 0xff).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn chat(messages: &[(&str, &str)]) -> Vec<u8> {
        let m: Vec<_> = messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
        json!({"model": "m", "messages": m, "stream": true}).to_string().into_bytes()
    }

    #[test]
    fn a_conversation_that_goes_on_shares_the_blocks_of_what_came_before() {
        let system = "You are a careful assistant. ".repeat(40);
        let turn1 = chat(&[("system", &system), ("user", "What is a gateway?")]);
        let turn2 = chat(&[
            ("system", &system),
            ("user", "What is a gateway?"),
            ("assistant", "A proxy in front of servers."),
            ("user", "And a prefix cache?"),
        ]);
        let (a, b) = (key_of(&turn1, 64).unwrap(), key_of(&turn2, 64).unwrap());
        assert!(a.full >= 18, "{a:?}");
        assert_eq!(a.blocks[..a.full], b.blocks[..a.full], "the first turn's whole blocks are the second's");
        assert!(b.blocks.len() > a.blocks.len());
        // Not only the first message: a different second message changes the blocks after it.
        let other = key_of(&chat(&[("system", &system), ("user", "Something else entirely")]), 64).unwrap();
        let system_blocks = system.len() / 64;
        assert_eq!(other.blocks[..system_blocks], a.blocks[..system_blocks]);
        assert_ne!(other.blocks.last(), a.blocks.last());
    }

    #[test]
    fn the_model_tools_and_completions_prompts_are_part_of_the_key() {
        let m1 = key_of(br#"{"model":"a","prompt":"hello world"}"#, 4).unwrap();
        let m2 = key_of(br#"{"model":"b","prompt":"hello world"}"#, 4).unwrap();
        assert_ne!(m1.blocks[0], m2.blocks[0], "same text, another model");
        assert_eq!((m1.bytes, m1.full, m1.blocks.len()), (11, 2, 3));
        let escaped = key_of(br#"{"model":"a","prompt":"hello\u0020world"}"#, 4).unwrap();
        assert_eq!(escaped, m1, "the text, not its JSON spelling");
        let tools = key_of(br#"{"model":"a","tools":[{"type":"function"}],"messages":[]}"#, 4).unwrap();
        let none = key_of(br#"{"model":"a","messages":[]}"#, 4).unwrap();
        assert_ne!(tools, none);
        assert_eq!(none.blocks.len(), 0);
        assert!(key_of(br#"{"model":"a"}"#, 4).is_none(), "neither messages nor prompt");
        assert!(key_of(b"not json", 4).is_none());
        let parts = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        assert!(key_of(parts, 4).unwrap().bytes > 10, "content parts are hashed as written");
    }

    proptest! {
        #[test]
        fn prompts_share_exactly_the_whole_blocks_of_their_common_prefix(
            common in "[a-z ]{0,300}", a in "[a-z ]{0,100}", b in "[a-z ]{0,100}", size in 1usize..64
        ) {
            let ka = key_of(json!({"prompt": format!("{common}{a}")}).to_string().as_bytes(), size).unwrap();
            let kb = key_of(json!({"prompt": format!("{common}{b}")}).to_string().as_bytes(), size).unwrap();
            let shared = common.len() / size;
            prop_assert_eq!(&ka.blocks[..shared], &kb.blocks[..shared]);
            let differ_at = common.len() + a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            let first_diff_block = differ_at / size;
            if a != b && first_diff_block < ka.blocks.len().min(kb.blocks.len()) {
                prop_assert_ne!(ka.blocks[first_diff_block], kb.blocks[first_diff_block]);
            }
        }

        #[test]
        fn any_body_is_read_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..400), size in 0usize..40) {
            let _ = key_of(&body, size);
        }
    }
}
