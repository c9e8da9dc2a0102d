//! The daemon's recent log lines, kept in memory for `skiff debug dump`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Lines kept.
pub const KEEP: usize = 2000;

/// A bounded ring of the most recent log lines; cheap to clone, shared with the logger.
#[derive(Clone, Debug, Default)]
pub struct Recent {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl Recent {
    /// Appends text (split into lines), dropping the oldest lines beyond [`KEEP`].
    pub fn push(&self, text: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines().filter(|l| !l.is_empty()) {
            if lines.len() == KEEP {
                lines.pop_front();
            }
            lines.push_back(line.to_string());
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_newest_lines() {
        let recent = Recent::default();
        for i in 0..KEEP + 10 {
            recent.push(&format!("line {i}\n"));
        }
        let lines = recent.lines();
        assert_eq!(lines.len(), KEEP);
        assert_eq!(lines[0], "line 10");
    }
}
