//! What a generation job runs: the [`Generator`] trait and the built-in offline generator.
//!
//! The built-in generator is extractive and deterministic: it works only on the note's own
//! sentences (TextRank over word overlap for the summary, the most frequent content words
//! for key terms, blanked-out key terms for the quiz), so it needs no network and gives the
//! same answer for the same note every time.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    pin::Pin,
    time::Duration,
};

use tokio::sync::mpsc;

/// What a job asks for, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Summary { max_sentences: usize },
    Explanation { max_terms: usize },
    Quiz { question_count: usize },
}

/// What a generator produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Summary(String),
    Explanation(Vec<(String, String)>),
    /// (prompt, answer, choices)
    Quiz(Vec<QuizQuestion>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuizQuestion {
    pub prompt: String,
    pub answer: String,
    pub choices: Vec<String>,
}

/// Why a generation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateError {
    /// Stable machine code, e.g. `NOTE_TOO_SHORT`.
    pub code: &'static str,
    pub message: String,
    /// Worth another attempt (a timeout, an unavailable model), or not (the note itself).
    pub retryable: bool,
}

impl GenerateError {
    pub fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: false,
        }
    }
}

/// Where a generator reports its steps; the worker records them on the job and stops the
/// generator (drops its future) when the job was cancelled or its lease lost.
#[derive(Debug, Clone)]
pub struct Progress {
    steps: mpsc::UnboundedSender<(i32, String)>,
    step_delay: Duration,
}

impl Progress {
    pub fn new(steps: mpsc::UnboundedSender<(i32, String)>, step_delay: Duration) -> Self {
        Self { steps, step_delay }
    }

    /// Reports `percent` done at `message`, then yields to the worker (so a cancel or a lost
    /// lease takes effect here), pausing for the configured step delay.
    pub async fn step(&self, percent: i32, message: &str) {
        let _ = self.steps.send((percent.clamp(0, 99), message.to_owned()));
        if self.step_delay.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(self.step_delay).await;
        }
    }
}

pub type GenerateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Output, GenerateError>> + Send + 'a>>;

/// Produces a job's result from a note's text.
pub trait Generator: Send + Sync + std::fmt::Debug {
    /// Named in results, e.g. `builtin`.
    fn name(&self) -> String;

    fn generate<'a>(
        &'a self,
        text: &'a str,
        request: &'a Request,
        progress: &'a Progress,
    ) -> GenerateFuture<'a>;
}

/// The default generator: extractive, offline, deterministic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

/// TextRank's work is quadratic in sentences: longer notes are ranked on their first ones.
const SENTENCES_MAX: usize = 1500;

impl Generator for Builtin {
    fn name(&self) -> String {
        "builtin".to_owned()
    }

    fn generate<'a>(
        &'a self,
        text: &'a str,
        request: &'a Request,
        progress: &'a Progress,
    ) -> GenerateFuture<'a> {
        Box::pin(async move {
            progress.step(5, "splitting sentences").await;
            let mut sentences = sentences(text);
            sentences.truncate(SENTENCES_MAX);
            if sentences.is_empty() {
                return Err(GenerateError::permanent(
                    "NOTE_TOO_SHORT",
                    "the note has no sentences to work on",
                ));
            }
            let words: Vec<Vec<String>> = sentences.iter().map(|s| content_words(s)).collect();
            progress.step(25, "ranking sentences").await;
            let scores = text_rank(&words);
            progress.step(60, "choosing key terms").await;
            let terms = key_terms(&words, &scores);
            progress.step(80, "writing the result").await;
            let output = match *request {
                Request::Summary { max_sentences } => {
                    Output::Summary(summary(&sentences, &scores, max_sentences))
                }
                Request::Explanation { max_terms } => Output::Explanation(explanations(
                    &sentences, &words, &scores, &terms, max_terms,
                )),
                Request::Quiz { question_count } => {
                    let questions = quiz(&sentences, &words, &scores, &terms, question_count);
                    if questions.is_empty() {
                        return Err(GenerateError::permanent(
                            "NOTE_TOO_SHORT",
                            "the note has no key terms to ask about",
                        ));
                    }
                    Output::Quiz(questions)
                }
            };
            progress.step(95, "done").await;
            Ok(output)
        })
    }
}

/// The note's sentences: markdown markers stripped, split at sentence ends and line breaks,
/// at least three words each.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line
            .trim()
            .trim_start_matches(['#', '>', '-', '*', '+', ' '])
            .replace(['*', '`', '_'], "");
        let mut current = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            current.push(c);
            let at_end = matches!(c, '.' | '!' | '?')
                && chars.peek().is_none_or(|next| next.is_whitespace());
            if at_end {
                push_sentence(&mut out, &current);
                current.clear();
            }
        }
        push_sentence(&mut out, &current);
    }
    out
}

fn push_sentence(out: &mut Vec<String>, text: &str) {
    let sentence = text.trim();
    if sentence.split_whitespace().count() >= 3 {
        out.push(sentence.to_owned());
    }
}

const STOP_WORDS: &[&str] = &[
    "about", "above", "after", "again", "against", "all", "also", "and", "any", "are", "because",
    "been", "before", "being", "below", "between", "both", "but", "can", "could", "did", "does",
    "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have",
    "having", "her", "here", "hers", "him", "his", "how", "into", "its", "itself", "just", "more",
    "most", "much", "must", "not", "now", "off", "once", "only", "other", "our", "ours", "out",
    "over", "own", "same", "she", "should", "some", "such", "than", "that", "the", "their",
    "theirs", "them", "then", "there", "these", "they", "this", "those", "through", "too", "under",
    "until", "very", "was", "were", "what", "when", "where", "which", "while", "who", "whom",
    "why", "will", "with", "would", "you", "your", "yours", "one", "two", "may", "many", "every",
    "used", "use", "uses", "like", "well", "even", "still", "yet",
];

/// Lower-cased words of at least three letters that are not stop words.
fn content_words(sentence: &str) -> Vec<String> {
    sentence
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 3)
        .map(str::to_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()) && !w.chars().all(|c| c.is_numeric()))
        .collect()
}

/// TextRank: sentences are nodes, edges weighted by shared words normalised by length;
/// 30 rounds of the damped power iteration.
fn text_rank(words: &[Vec<String>]) -> Vec<f64> {
    let n = words.len();
    let sets: Vec<HashSet<&str>> = words
        .iter()
        .map(|w| w.iter().map(String::as_str).collect())
        .collect();
    let mut weights = vec![vec![0.0_f64; n]; n];
    for i in 0..n {
        for j in (i + 1)..n {
            let shared = sets[i].intersection(&sets[j]).count();
            if shared == 0 {
                continue;
            }
            let norm = ((sets[i].len() as f64) + 1.0).ln() + ((sets[j].len() as f64) + 1.0).ln();
            let weight = shared as f64 / norm.max(1.0);
            weights[i][j] = weight;
            weights[j][i] = weight;
        }
    }
    let totals: Vec<f64> = weights.iter().map(|row| row.iter().sum()).collect();
    let damping = 0.85;
    let mut scores = vec![1.0_f64; n];
    for _ in 0..30 {
        let mut next = vec![1.0 - damping; n];
        for (i, next_score) in next.iter_mut().enumerate() {
            let mut sum = 0.0;
            for j in 0..n {
                if weights[j][i] > 0.0 && totals[j] > 0.0 {
                    sum += weights[j][i] / totals[j] * scores[j];
                }
            }
            *next_score += damping * sum;
        }
        scores = next;
    }
    scores
}

/// Sentence indices by score, best first (ties: earlier first).
fn ranked(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

fn summary(sentences: &[String], scores: &[f64], max_sentences: usize) -> String {
    let mut chosen: Vec<usize> = ranked(scores).into_iter().take(max_sentences).collect();
    chosen.sort_unstable();
    chosen
        .into_iter()
        .map(|i| sentences[i].as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Content words by weight (occurrences weighted by their sentences' rank), best first;
/// ties alphabetical. Words seen once are not key terms unless the note is short.
fn key_terms(words: &[Vec<String>], scores: &[f64]) -> Vec<String> {
    let mut weight: HashMap<&str, (f64, usize)> = HashMap::new();
    for (sentence, score) in words.iter().zip(scores) {
        for word in sentence {
            let entry = weight.entry(word.as_str()).or_insert((0.0, 0));
            entry.0 += score;
            entry.1 += 1;
        }
    }
    let repeated = weight.values().filter(|(_, count)| *count > 1).count();
    let mut terms: Vec<(&str, f64)> = weight
        .into_iter()
        .filter(|(_, (_, count))| repeated < 3 || *count > 1)
        .map(|(word, (w, _))| (word, w))
        .collect();
    terms.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    terms.into_iter().map(|(w, _)| w.to_owned()).collect()
}

fn explanations(
    sentences: &[String],
    words: &[Vec<String>],
    scores: &[f64],
    terms: &[String],
    max_terms: usize,
) -> Vec<(String, String)> {
    let order = ranked(scores);
    terms
        .iter()
        .take(max_terms)
        .filter_map(|term| {
            let best = order.iter().find(|&&i| words[i].contains(term))?;
            Some((term.clone(), sentences[*best].clone()))
        })
        .collect()
}

fn quiz(
    sentences: &[String],
    words: &[Vec<String>],
    scores: &[f64],
    terms: &[String],
    count: usize,
) -> Vec<QuizQuestion> {
    let rank_of: BTreeMap<&str, usize> = terms
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut questions = Vec::new();
    for i in ranked(scores) {
        if questions.len() >= count {
            break;
        }
        // The sentence's best key term becomes the blank.
        let Some(term) = words[i]
            .iter()
            .filter_map(|w| rank_of.get(w.as_str()).map(|rank| (*rank, w)))
            .min()
            .map(|(_, w)| w.clone())
        else {
            continue;
        };
        let Some((prompt, answer)) = blank_out(&sentences[i], &term) else {
            continue;
        };
        let mut choices: Vec<String> = terms
            .iter()
            .filter(|t| **t != term)
            .take(3)
            .cloned()
            .collect();
        choices.push(answer.to_lowercase());
        choices.sort();
        questions.push(QuizQuestion {
            prompt,
            answer,
            choices,
        });
    }
    questions
}

/// The sentence with the first whole-word occurrence of `term` (any case) replaced by
/// `____`, and the word as written.
fn blank_out(sentence: &str, term: &str) -> Option<(String, String)> {
    let mut start = None;
    let mut index = 0;
    for piece in sentence.split_inclusive(|c: char| !c.is_alphanumeric()) {
        let word = piece.trim_end_matches(|c: char| !c.is_alphanumeric());
        if word.to_lowercase() == term {
            start = Some((index, word.len()));
            break;
        }
        index += piece.len();
    }
    let (at, len) = start?;
    let answer = sentence[at..at + len].to_owned();
    let prompt = format!("{}____{}", &sentence[..at], &sentence[at + len..]);
    Some((prompt, answer))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: fail loudly")]

    use super::*;

    const NOTE: &str = "# Photosynthesis\n\
        Photosynthesis converts light energy into chemical energy in plants. \
        Chlorophyll absorbs light energy mostly in the blue and red wavelengths. \
        The light reactions happen in the thylakoid membranes of the chloroplast. \
        The Calvin cycle uses chemical energy to fix carbon dioxide into sugar. \
        Plants release oxygen as a product of splitting water in the light reactions.\n\
        - Chloroplast structure matters for light capture in plants.";

    async fn run(request: Request) -> (Result<Output, GenerateError>, Vec<i32>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let progress = Progress::new(tx, Duration::ZERO);
        let output = Builtin.generate(NOTE, &request, &progress).await;
        drop(progress);
        let mut steps = Vec::new();
        while let Some((percent, _)) = rx.recv().await {
            steps.push(percent);
        }
        (output, steps)
    }

    #[test]
    fn sentences_split_at_ends_and_lines() {
        let found = sentences("# Title words here\nOne two three. Four five six! x y\n- a b c d");
        assert_eq!(
            found,
            [
                "Title words here",
                "One two three.",
                "Four five six!",
                "a b c d"
            ]
        );
    }

    #[tokio::test]
    async fn summary_keeps_the_best_sentences_in_note_order_and_progress_rises() {
        let (output, steps) = run(Request::Summary { max_sentences: 2 }).await;
        let Output::Summary(text) = output.unwrap() else {
            panic!("a summary")
        };
        let all = sentences(NOTE);
        let picked: Vec<&String> = all.iter().filter(|s| text.contains(s.as_str())).collect();
        assert_eq!(picked.len(), 2, "{text}");
        assert!(text.find(picked[0].as_str()) < text.find(picked[1].as_str()));
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        // Deterministic.
        let (again, _) = run(Request::Summary { max_sentences: 2 }).await;
        assert_eq!(again.unwrap(), Output::Summary(text));
    }

    #[tokio::test]
    async fn explanation_and_quiz_come_from_the_note() {
        let (output, _) = run(Request::Explanation { max_terms: 3 }).await;
        let Output::Explanation(terms) = output.unwrap() else {
            panic!("terms")
        };
        assert_eq!(terms.len(), 3);
        assert!(terms.iter().any(|(t, _)| t == "light"), "{terms:?}");
        for (term, sentence) in &terms {
            assert!(sentence.to_lowercase().contains(term.as_str()));
        }

        let (output, _) = run(Request::Quiz { question_count: 4 }).await;
        let Output::Quiz(questions) = output.unwrap() else {
            panic!("quiz")
        };
        assert_eq!(questions.len(), 4);
        for q in &questions {
            assert!(q.prompt.contains("____"), "{q:?}");
            let filled = q.prompt.replace("____", &q.answer);
            assert!(NOTE.contains(&filled), "{filled}");
            assert!(q.choices.contains(&q.answer.to_lowercase()));
        }
    }

    #[tokio::test]
    async fn an_empty_note_fails_for_good() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let progress = Progress::new(tx, Duration::ZERO);
        let error = Builtin
            .generate("# x", &Request::Summary { max_sentences: 3 }, &progress)
            .await
            .unwrap_err();
        assert_eq!(error.code, "NOTE_TOO_SHORT");
        assert!(!error.retryable);
    }
}
