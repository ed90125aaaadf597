//! The pool knobs do what the README says, against the real servers.

use std::time::Duration;

use e2e::Infra;
use platform::{config::Env, postgres::PgConfig, redis_pool::RedisConfig};
use tonic::Code;

fn pg_config(infra: &Infra, database: &str, extra: &[(&str, &str)]) -> PgConfig {
    let mut vars = vec![("T_DATABASE_URL".to_owned(), infra.url_for(database))];
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| (format!("T_{k}"), (*v).to_owned())),
    );
    let env = Env::from_pairs("T", vars);
    let config = PgConfig::from_env(&env);
    env.finish().expect("valid pool settings");
    config
}

#[tokio::test]
async fn statement_timeout_is_enforced_by_the_server_and_maps_to_deadline_exceeded() {
    let infra = Infra::from_env();
    let database = infra.create_database("stmt").await;
    let config = pg_config(&infra, &database, &[("DB_STATEMENT_TIMEOUT", "150ms")]);
    let pool = platform::postgres::lazy_pool(&config, "e2e").expect("pool");

    let setting: String = sqlx::query_scalar("show statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("show");
    assert_eq!(setting, "150ms");

    let error = sqlx::query("select pg_sleep(2)")
        .execute(&pool)
        .await
        .expect_err("cancelled by statement_timeout");
    assert_eq!(
        platform::error::from_sqlx(&error).code(),
        Code::DeadlineExceeded
    );
    // The connection survives the cancellation and serves the next statement.
    sqlx::query("select 1")
        .execute(&pool)
        .await
        .expect("next statement");
}

#[tokio::test]
async fn an_exhausted_pool_fails_fast_with_unavailable() {
    let infra = Infra::from_env();
    let database = infra.create_database("acquire").await;
    let config = pg_config(
        &infra,
        &database,
        &[
            ("DB_MAX_CONNECTIONS", "1"),
            ("DB_MIN_CONNECTIONS", "0"),
            ("DB_ACQUIRE_TIMEOUT", "200ms"),
        ],
    );
    let pool = platform::postgres::lazy_pool(&config, "e2e").expect("pool");
    let held = pool.acquire().await.expect("the only connection");

    let started = tokio::time::Instant::now();
    let error = pool.acquire().await.expect_err("no second connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );
    let status = platform::error::from_sqlx(&error);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(platform::error::is_retryable(&status));
    drop(held);
    pool.acquire().await.expect("free again once returned");
}

#[tokio::test]
async fn redis_pool_answers_and_keys_carry_the_prefix() {
    let infra = Infra::from_env();
    let prefix = format!("e2e:{}:", uuid::Uuid::new_v4().simple());
    let env = Env::from_pairs(
        "T",
        [
            ("T_REDIS_URL".to_owned(), infra.redis_url.clone()),
            ("T_REDIS_KEY_PREFIX".to_owned(), prefix.clone()),
        ],
    );
    let config = RedisConfig::from_env(&env, "unused:");
    env.finish().expect("valid redis settings");
    let pool = platform::redis_pool::lazy_pool(&config).expect("pool");
    platform::redis_pool::ping(&pool)
        .await
        .expect("redis answers");

    let key = config.key("probe");
    assert_eq!(key, format!("{prefix}probe"));
    let mut conn = pool.get().await.expect("connection");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("1")
        .arg("EX")
        .arg(30)
        .query_async(&mut *conn)
        .await
        .expect("set");
    let value: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut *conn)
        .await
        .expect("get");
    assert_eq!(value.as_deref(), Some("1"));
}

#[tokio::test]
async fn an_unreachable_redis_is_reported_not_hung_on() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let env = Env::from_pairs(
        "T",
        [
            ("T_REDIS_URL".to_owned(), format!("redis://{addr}/0")),
            ("T_REDIS_CONNECTION_TIMEOUT".to_owned(), "300ms".to_owned()),
        ],
    );
    let config = RedisConfig::from_env(&env, "t:");
    env.finish().expect("valid redis settings");
    let pool = platform::redis_pool::lazy_pool(&config).expect("pool builds without Redis");
    let started = tokio::time::Instant::now();
    assert!(platform::redis_pool::ping(&pool).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
}
