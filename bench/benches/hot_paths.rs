//! Micro-benchmarks of the hot paths, in release mode: `cargo bench -p bench`
//! (`cargo bench -p bench -- argon2` for one group). See docs/performance.md.
//!
//! - `access_token/verify`: what the gateway and every service do per authenticated call.
//! - `argon2id/verify`: one login's password check through auth's hasher pool, one worker
//!   thread, OWASP parameters (auth's defaults).
//! - `proto/*` and `json/*`: the largest hot messages, auth.v1 LoginResponse and
//!   profile.v1 GetMyProfileResponse, encoded and decoded as protobuf, and rendered as the
//!   JSON the gateway answers with.
//!
//! Not yet: the profile cache's get per level (in-process, Redis), once that cache exists.

use std::{hint::black_box, time::Duration};

use auth::{
    domain::Password,
    password::{HasherConfig, PasswordHasher, VerifyOutcome},
    tokens::TokenIssuer,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use platform::config::Secret;
use prost::Message as _;
use proto::{auth::v1 as auth_pb, profile::v1 as profile_pb};
use serde::Serialize;

/// A key for these benchmarks only (Ed25519, PKCS#8 PEM).
const BENCH_SIGNING_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIIVsFNdehFAdGNmv9uLoKU9bM5eaMnvZaZaGuCFheXS9
-----END PRIVATE KEY-----
";
const USER_ID: &str = "0190c5d2-7b1e-7c3a-9f00-2b7e4c1d9a10";
const SESSION_ID: &str = "0190c5d2-7b1f-7000-8000-1a2b3c4d5e6f";

fn issuer() -> anyhow::Result<TokenIssuer> {
    Ok(TokenIssuer::from_pems(
        &[Secret::new(BENCH_SIGNING_KEY)],
        "svcset-auth",
        "svcset",
        Duration::from_secs(900),
    )?)
}

fn access_token(issuer: &TokenIssuer) -> anyhow::Result<String> {
    Ok(issuer.issue(
        USER_ID.parse()?,
        SESSION_ID.parse()?,
        vec!["user".to_owned()],
    )?)
}

fn bench_access_token(c: &mut Criterion) -> anyhow::Result<()> {
    let issuer = issuer()?;
    let verifier = issuer.verifier()?;
    let token = access_token(&issuer)?;
    // A benchmark of a failing path would measure nothing useful.
    anyhow::ensure!(verifier.verify(&token).is_ok(), "the token must verify");
    c.bench_function("access_token/verify", |b| {
        b.iter(|| verifier.verify(black_box(&token)))
    });
    Ok(())
}

fn bench_argon2(c: &mut Criterion) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hasher = PasswordHasher::start(HasherConfig {
        memory_kib: HasherConfig::OWASP_MEMORY_KIB,
        iterations: HasherConfig::OWASP_ITERATIONS,
        parallelism: HasherConfig::OWASP_PARALLELISM,
        workers: 1,
        queue: 1,
    })?;
    let password = Password::parse_presented("password", "correct horse battery staple")
        .map_err(|v| anyhow::anyhow!("{}", v.message))?;
    let phc = runtime.block_on(hasher.hash(password.clone()))?;
    let outcome = runtime.block_on(hasher.verify(password.clone(), Some(phc.clone())))?;
    anyhow::ensure!(
        outcome
            == VerifyOutcome::Match {
                needs_rehash: false
            },
        "the password must match"
    );
    let mut group = c.benchmark_group("argon2id");
    // Tens of milliseconds each: the fewest samples criterion takes, over a longer window.
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("verify", |b| {
        b.iter(|| runtime.block_on(hasher.verify(password.clone(), Some(phc.clone()))))
    });
    group.finish();
    Ok(())
}

fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn login_response(issuer: &TokenIssuer) -> anyhow::Result<auth_pb::LoginResponse> {
    Ok(auth_pb::LoginResponse {
        access_token: access_token(issuer)?,
        // 256 random bits, base64url: the shape auth hands out.
        refresh_token: "q3Vt0o2lRzB8cR1d5yJ0u0h0m7vQz1x0bW9yZXJhbmRvbWJ5dGVzMTIz".to_owned(),
        token_type: "Bearer".to_owned(),
        expires_in: 900,
        user_id: USER_ID.to_owned(),
    })
}

/// A full profile: every field set, a paid plan, a bio of typical length.
fn profile_response() -> profile_pb::GetMyProfileResponse {
    profile_pb::GetMyProfileResponse {
        profile: Some(profile_pb::Profile {
            user_id: USER_ID.to_owned(),
            email: "user42@example.com".to_owned(),
            display_name: "Ada Lovelace".to_owned(),
            bio: "Mathematician and writer, chiefly known for work on the Analytical Engine. \
                  Notes on algorithms, poetical science and the occasional recipe."
                .to_owned(),
            avatar_url: "https://cdn.example.com/avatars/0190c5d2-7b1e-7c3a-9f00-2b7e4c1d9a10.png"
                .to_owned(),
            profession_type: Some(profile_pb::CatalogRef {
                id: "0190c5d2-0000-7000-8000-000000000001".to_owned(),
                name: "Software engineer".to_owned(),
            }),
            business_category: Some(profile_pb::CatalogRef {
                id: "0190c5d2-0000-7000-8000-000000000002".to_owned(),
                name: "Education".to_owned(),
            }),
            locale: "en-GB".to_owned(),
            created_at: Some(timestamp(1_764_000_000)),
            updated_at: Some(timestamp(1_764_050_000)),
            subscription: Some(profile_pb::Subscription {
                plan_id: "pro".to_owned(),
                status: profile_pb::SubscriptionStatus::Active as i32,
                plan_name: "Pro".to_owned(),
                features: vec![
                    "ai_generation".to_owned(),
                    "custom_frames".to_owned(),
                    "priority_support".to_owned(),
                ],
                ai_daily_limit: 50,
                end_date: Some(timestamp(1_795_536_000)),
                is_customer: true,
                is_expired: false,
            }),
            roles: vec!["user".to_owned()],
            etag: "\"v17\"".to_owned(),
        }),
    }
}

fn bench_proto(c: &mut Criterion) -> anyhow::Result<()> {
    let login = login_response(&issuer()?)?;
    let profile = profile_response();
    let login_bytes = login.encode_to_vec();
    let profile_bytes = profile.encode_to_vec();
    anyhow::ensure!(auth_pb::LoginResponse::decode(login_bytes.as_slice())? == login);
    anyhow::ensure!(profile_pb::GetMyProfileResponse::decode(profile_bytes.as_slice())? == profile);

    let mut group = c.benchmark_group("proto");
    group.throughput(Throughput::Bytes(login_bytes.len() as u64));
    group.bench_function("login_response/encode", |b| {
        b.iter(|| black_box(&login).encode_to_vec())
    });
    group.bench_function("login_response/decode", |b| {
        b.iter(|| auth_pb::LoginResponse::decode(black_box(login_bytes.as_slice())))
    });
    group.throughput(Throughput::Bytes(profile_bytes.len() as u64));
    group.bench_function("profile_response/encode", |b| {
        b.iter(|| black_box(&profile).encode_to_vec())
    });
    group.bench_function("profile_response/decode", |b| {
        b.iter(|| profile_pb::GetMyProfileResponse::decode(black_box(profile_bytes.as_slice())))
    });
    group.finish();
    Ok(())
}

/// The gateway's login answer (its field names and order).
#[derive(Serialize)]
struct TokenReply<'a> {
    access_token: &'a str,
    refresh_token: &'a str,
    token_type: &'a str,
    expires_in: i32,
    user_id: &'a str,
}

impl<'a> From<&'a auth_pb::LoginResponse> for TokenReply<'a> {
    fn from(r: &'a auth_pb::LoginResponse) -> Self {
        Self {
            access_token: &r.access_token,
            refresh_token: &r.refresh_token,
            token_type: &r.token_type,
            expires_in: r.expires_in,
            user_id: &r.user_id,
        }
    }
}

/// The profile as JSON: the same data as the protobuf message, timestamps as RFC 3339
/// text. The gateway's own profile DTO replaces this once its route exists.
#[derive(Serialize)]
struct ProfileReply<'a> {
    user_id: &'a str,
    email: &'a str,
    display_name: &'a str,
    bio: &'a str,
    avatar_url: Option<&'a str>,
    profession_type: Option<CatalogReply<'a>>,
    business_category: Option<CatalogReply<'a>>,
    locale: Option<&'a str>,
    created_at: Option<String>,
    updated_at: Option<String>,
    subscription: Option<SubscriptionReply<'a>>,
    roles: &'a [String],
    etag: &'a str,
}

#[derive(Serialize)]
struct CatalogReply<'a> {
    id: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct SubscriptionReply<'a> {
    plan_id: &'a str,
    status: &'static str,
    plan_name: &'a str,
    features: &'a [String],
    ai_daily_limit: i32,
    end_date: Option<String>,
    is_customer: bool,
    is_expired: bool,
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(ToString::to_string)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl<'a> From<&'a profile_pb::Profile> for ProfileReply<'a> {
    fn from(p: &'a profile_pb::Profile) -> Self {
        let catalog = |c: &'a profile_pb::CatalogRef| CatalogReply {
            id: &c.id,
            name: &c.name,
        };
        Self {
            user_id: &p.user_id,
            email: &p.email,
            display_name: &p.display_name,
            bio: &p.bio,
            avatar_url: non_empty(&p.avatar_url),
            profession_type: p.profession_type.as_ref().map(catalog),
            business_category: p.business_category.as_ref().map(catalog),
            locale: non_empty(&p.locale),
            created_at: rfc3339(p.created_at.as_ref()),
            updated_at: rfc3339(p.updated_at.as_ref()),
            subscription: p.subscription.as_ref().map(|s| SubscriptionReply {
                plan_id: &s.plan_id,
                status: match profile_pb::SubscriptionStatus::try_from(s.status) {
                    Ok(profile_pb::SubscriptionStatus::Active) => "active",
                    Ok(profile_pb::SubscriptionStatus::Trialing) => "trialing",
                    Ok(profile_pb::SubscriptionStatus::PastDue) => "past_due",
                    Ok(profile_pb::SubscriptionStatus::Canceled) => "canceled",
                    Ok(profile_pb::SubscriptionStatus::Expired) => "expired",
                    _ => "unspecified",
                },
                plan_name: &s.plan_name,
                features: &s.features,
                ai_daily_limit: s.ai_daily_limit,
                end_date: rfc3339(s.end_date.as_ref()),
                is_customer: s.is_customer,
                is_expired: s.is_expired,
            }),
            roles: &p.roles,
            etag: &p.etag,
        }
    }
}

fn bench_json(c: &mut Criterion) -> anyhow::Result<()> {
    let login = login_response(&issuer()?)?;
    let response = profile_response();
    let profile = response
        .profile
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the profile is set"))?;
    let login_json = serde_json::to_vec(&TokenReply::from(&login))?;
    let profile_json = serde_json::to_vec(&ProfileReply::from(profile))?;

    let mut group = c.benchmark_group("json");
    group.throughput(Throughput::Bytes(login_json.len() as u64));
    group.bench_function("login_response/render", |b| {
        b.iter(|| serde_json::to_vec(&TokenReply::from(black_box(&login))))
    });
    group.throughput(Throughput::Bytes(profile_json.len() as u64));
    group.bench_function("profile_response/render", |b| {
        b.iter(|| serde_json::to_vec(&ProfileReply::from(black_box(profile))))
    });
    group.finish();
    Ok(())
}

/// Each group sets itself up and fails loudly rather than measuring a broken path.
fn hot_paths(c: &mut Criterion) {
    type Bench = fn(&mut Criterion) -> anyhow::Result<()>;
    let benches: [(&str, Bench); 4] = [
        ("access_token", bench_access_token),
        ("argon2id", bench_argon2),
        ("proto", bench_proto),
        ("json", bench_json),
    ];
    for (name, bench) in benches {
        if let Err(e) = bench(c) {
            panic!("benchmark set-up of {name} failed: {e:#}");
        }
    }
}

criterion_group! {
    name = benches;
    // Short windows: enough for stable medians of these sub-millisecond paths.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = hot_paths
}
criterion_main!(benches);
