//! A [`Generator`] over any OpenAI-compatible chat-completions endpoint
//! (`POST <base>/chat/completions`): a hosted model behind a TLS-terminating proxy, or a local
//! one (llama.cpp, Ollama, vLLM) spoken to directly over HTTP.
//!
//! Each call is bounded by `NOTES_OPENAI_TIMEOUT`; a timeout, a refused connection, 429 or a
//! 5xx is tried again up to `NOTES_OPENAI_RETRIES` times within the attempt (backoff 200 ms,
//! doubling), and then fails the attempt as retryable, so the job queue's own retries follow.
//! Another 4xx fails the job for good (`GENERATOR_REJECTED`): asking again would not help.

use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use platform::config::{Env, Secret};
use serde_json::{Value, json};

use crate::generator::{
    GenerateError, GenerateFuture, Generator, Output, Progress, QuizQuestion, Request,
};

/// The note text sent to the model is cut at this many characters.
const NOTE_CHARS_MAX: usize = 100_000;
/// A response larger than this is refused.
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Settings of the OpenAI-compatible generator (`NOTES_OPENAI_*`).
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// `NOTES_OPENAI_BASE_URL`, e.g. `http://127.0.0.1:11434/v1` (plain HTTP).
    pub base_url: String,
    /// `NOTES_OPENAI_MODEL`.
    pub model: String,
    /// `NOTES_OPENAI_API_KEY` or `NOTES_OPENAI_API_KEY_FILE` (optional): sent as a bearer token.
    pub api_key: Option<Secret>,
    /// `NOTES_OPENAI_TIMEOUT` (default 60s): bound on each call.
    pub timeout: Duration,
    /// `NOTES_OPENAI_RETRIES` (default 2): further tries of a failed call within an attempt.
    pub retries: u32,
}

impl OpenAiConfig {
    /// The settings when `NOTES_GENERATOR=openai`; problems are reported on `env`.
    pub fn from_env(env: &Env) -> Self {
        // Required only with `NOTES_GENERATOR=openai`, so checked here rather than with
        // `Env::required` (which the manifests check treats as always required).
        let needed = |name: &str| {
            env.optional::<String>(name).unwrap_or_else(|| {
                env.problem(
                    &env.name(name),
                    "missing (required with NOTES_GENERATOR=openai)".to_owned(),
                );
                String::new()
            })
        };
        let base_url = needed("OPENAI_BASE_URL").trim_end_matches('/').to_owned();
        let model = needed("OPENAI_MODEL");
        if !base_url.is_empty() && !base_url.starts_with("http://") {
            env.problem(
                &env.name("OPENAI_BASE_URL"),
                "must be an http:// URL (put a TLS-terminating proxy in front of an https endpoint)"
                    .to_owned(),
            );
        }
        // Optional: read (from the variable or its _FILE) only when one of them is set.
        let has_key = env.optional::<String>(API_KEY).is_some()
            || env.optional::<String>("OPENAI_API_KEY_FILE").is_some();
        Self {
            base_url,
            model,
            api_key: has_key.then(|| env.secret(API_KEY)),
            timeout: env.duration_or("OPENAI_TIMEOUT", Duration::from_secs(60)),
            retries: env.or("OPENAI_RETRIES", 2),
        }
    }
}

/// The endpoint's key variable (or its `_FILE`).
const API_KEY: &str = "OPENAI_API_KEY";

/// The generator itself: one pooled HTTP/1.1 client.
#[derive(Debug, Clone)]
pub struct OpenAi {
    config: OpenAiConfig,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Why one call failed.
enum CallError {
    /// Worth another try (timeout, connection, 429, 5xx).
    Transient(&'static str, String),
    Permanent(&'static str, String),
}

impl OpenAi {
    pub fn new(config: OpenAiConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        Self {
            config,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    async fn call(&self, body: &Value) -> Result<String, CallError> {
        let url = format!("{}/chat/completions", self.config.base_url);
        let mut request = http::Request::post(&url).header("content-type", "application/json");
        if let Some(key) = &self.config.api_key {
            request = request.header("authorization", format!("Bearer {}", key.expose()));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| CallError::Permanent("GENERATOR_MISCONFIGURED", e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                CallError::Transient("GENERATOR_UNAVAILABLE", format!("request failed: {e}"))
            })?;
            let status = response.status();
            let bytes = http_body_util::Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| {
                    CallError::Transient(
                        "GENERATOR_UNAVAILABLE",
                        format!("reading the answer: {e}"),
                    )
                })?
                .to_bytes();
            Ok::<_, CallError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| {
                CallError::Transient(
                    "GENERATOR_TIMEOUT",
                    format!("no answer within {:?}", self.config.timeout),
                )
            })??;
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(CallError::Transient(
                "GENERATOR_UNAVAILABLE",
                format!("the model answered {status}"),
            ));
        }
        if !status.is_success() {
            return Err(CallError::Permanent(
                "GENERATOR_REJECTED",
                format!("the model refused the request ({status})"),
            ));
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| {
            CallError::Transient(
                "GENERATOR_BAD_RESPONSE",
                "the answer is not JSON".to_owned(),
            )
        })?;
        answer["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                CallError::Transient(
                    "GENERATOR_BAD_RESPONSE",
                    "the answer has no choices[0].message.content".to_owned(),
                )
            })
    }

    /// The call, tried again on transient failures.
    async fn complete(&self, body: &Value) -> Result<String, GenerateError> {
        let mut delay = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            match self.call(body).await {
                Ok(content) => return Ok(content),
                Err(CallError::Transient(code, message)) if tries < self.config.retries => {
                    tracing::info!(code, %message, ?delay, "model call failed: trying again");
                    tries += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(CallError::Transient(code, message)) => {
                    return Err(GenerateError {
                        code,
                        message,
                        retryable: true,
                    });
                }
                Err(CallError::Permanent(code, message)) => {
                    return Err(GenerateError::permanent(code, message));
                }
            }
        }
    }
}

/// The instruction for each kind; structured kinds answer JSON.
fn instruction(request: &Request) -> String {
    match request {
        Request::Summary { max_sentences } => format!(
            "Summarise the user's note in at most {max_sentences} sentences. Answer with the \
             summary only, as markdown."
        ),
        Request::Explanation { max_terms } => format!(
            "Pick at most {max_terms} key terms of the user's note and explain each in one or \
             two sentences. Answer with JSON only: {{\"terms\": [{{\"term\": \"...\", \
             \"explanation\": \"...\"}}]}}"
        ),
        Request::Quiz { question_count } => format!(
            "Write {question_count} quiz questions about the user's note, each with its answer \
             and four choices including the answer. Answer with JSON only: {{\"questions\": \
             [{{\"prompt\": \"...\", \"answer\": \"...\", \"choices\": [\"...\"]}}]}}"
        ),
    }
}

/// JSON out of a model's answer, allowing a markdown code fence around it.
fn json_in(content: &str) -> Option<Value> {
    let trimmed = content.trim();
    let inner = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(inner.trim()).ok()
}

fn text(value: &Value, key: &str) -> Option<String> {
    value
        .get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The model's answer as an [`Output`], or why it is unusable.
pub fn parse_output(request: &Request, content: &str) -> Result<Output, GenerateError> {
    let bad = |what: &str| GenerateError {
        code: "GENERATOR_BAD_RESPONSE",
        message: format!("the model's answer {what}"),
        retryable: true,
    };
    match request {
        Request::Summary { .. } => {
            let summary = content.trim();
            if summary.is_empty() {
                return Err(bad("is empty"));
            }
            Ok(Output::Summary(summary.to_owned()))
        }
        Request::Explanation { max_terms } => {
            let value = json_in(content).ok_or_else(|| bad("is not the JSON asked for"))?;
            let terms: Vec<(String, String)> = value["terms"]
                .as_array()
                .ok_or_else(|| bad("has no terms"))?
                .iter()
                .filter_map(|t| Some((text(t, "term")?, text(t, "explanation")?)))
                .take(*max_terms)
                .collect();
            if terms.is_empty() {
                return Err(bad("has no usable terms"));
            }
            Ok(Output::Explanation(terms))
        }
        Request::Quiz { question_count } => {
            let value = json_in(content).ok_or_else(|| bad("is not the JSON asked for"))?;
            let questions: Vec<QuizQuestion> = value["questions"]
                .as_array()
                .ok_or_else(|| bad("has no questions"))?
                .iter()
                .filter_map(|q| {
                    Some(QuizQuestion {
                        prompt: text(q, "prompt")?,
                        answer: text(q, "answer")?,
                        choices: q["choices"]
                            .as_array()
                            .map(|c| {
                                c.iter()
                                    .filter_map(|v| v.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                })
                .take(*question_count)
                .collect();
            if questions.is_empty() {
                return Err(bad("has no usable questions"));
            }
            Ok(Output::Quiz(questions))
        }
    }
}

impl Generator for OpenAi {
    fn name(&self) -> String {
        format!("openai:{}", self.config.model)
    }

    fn generate<'a>(
        &'a self,
        text: &'a str,
        request: &'a Request,
        progress: &'a Progress,
    ) -> GenerateFuture<'a> {
        Box::pin(async move {
            let note: String = text.chars().take(NOTE_CHARS_MAX).collect();
            let body = json!({
                "model": self.config.model,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": instruction(request)},
                    {"role": "user", "content": note},
                ],
            });
            progress.step(10, "asking the model").await;
            let content = self.complete(&body).await?;
            progress.step(90, "reading the answer").await;
            parse_output(request, &content)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: fail loudly")]

    use super::*;

    #[test]
    fn answers_parse_with_or_without_a_fence_and_bad_ones_are_retryable() {
        let quiz = Request::Quiz { question_count: 1 };
        let fenced = "```json\n{\"questions\": [{\"prompt\": \"2+2?\", \"answer\": \"4\", \"choices\": [\"3\", \"4\"]}, {\"prompt\": \"x\", \"answer\": \"y\"}]}\n```";
        let Output::Quiz(questions) = parse_output(&quiz, fenced).unwrap() else {
            panic!("a quiz")
        };
        assert_eq!(questions.len(), 1, "at most question_count");
        assert_eq!(questions[0].answer, "4");

        let terms = Request::Explanation { max_terms: 5 };
        let plain =
            r#"{"terms": [{"term": "TextRank", "explanation": "A ranking."}, {"term": ""}]}"#;
        assert_eq!(
            parse_output(&terms, plain).unwrap(),
            Output::Explanation(vec![("TextRank".to_owned(), "A ranking.".to_owned())])
        );
        let error = parse_output(&terms, "Sure! Here are the terms.").unwrap_err();
        assert_eq!(error.code, "GENERATOR_BAD_RESPONSE");
        assert!(error.retryable);
        assert!(parse_output(&Request::Summary { max_sentences: 2 }, "  ").is_err());
    }
}
