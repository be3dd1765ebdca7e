//! SigV4 presigning of the AWS IoT Core MQTT-over-WebSocket URL.
//!
//! `GET wss://<host>/mqtt`, service `iotdevicegateway`, signature in the query string, only the
//! `host` header signed, payload hash of the empty string. The session token is appended after
//! signing, unsigned and last: AWS IoT rejects a signed token.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    SessionTokenMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;

use crate::relay::config::{Secret, SignError, SignFuture, SignedUrl, UrlSigner};

/// The signing name of the AWS IoT data plane.
pub const SERVICE: &str = "iotdevicegateway";

/// Why presigning failed (never contains credentials).
#[derive(Debug, thiserror::Error)]
pub enum PresignError {
    #[error("invalid endpoint host '{0}'")]
    Host(String),
    #[error("invalid endpoint URL: {0}")]
    Url(#[source] http::Error),
    #[error("signing failed: {0}")]
    Sign(#[source] crate::error::Source),
}

/// Presigns `wss://<host>/mqtt` at `time`, valid for `expires`.
pub fn presign_iot_url(
    host: &str,
    region: &str,
    credentials: &Credentials,
    time: SystemTime,
    expires: Duration,
) -> Result<String, PresignError> {
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(PresignError::Host(host.to_owned()));
    }
    let base = format!("wss://{host}/mqtt");
    // Sign with the keys alone; the session token is appended to the signed URL afterwards.
    let keys_only = Credentials::new(
        credentials.access_key_id(),
        credentials.secret_access_key(),
        None,
        None,
        "iot-operator-presign",
    );
    let identity = keys_only.into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(expires);
    settings.session_token_mode = SessionTokenMode::Exclude;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| PresignError::Sign(crate::error::Source::new(e)))?
        .into();
    let signable = SignableRequest::new(
        "GET",
        base.as_str(),
        [("host", host)].into_iter(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| PresignError::Sign(crate::error::Source::new(e)))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| PresignError::Sign(crate::error::Source::new(e)))?
        .into_parts();
    let mut request = http::Request::builder()
        .uri(base.as_str())
        .body(())
        .map_err(PresignError::Url)?;
    instructions.apply_to_request_http1x(&mut request);
    let mut url = format!(
        "wss://{host}{}",
        request
            .uri()
            .path_and_query()
            .map_or("/mqtt", |p| p.as_str())
    );
    if let Some(token) = credentials.session_token() {
        url.push_str("&X-Amz-Security-Token=");
        url.extend(url::form_urlencoded::byte_serialize(token.as_bytes()));
    }
    Ok(url)
}

/// Resolving the credentials to sign with failed.
#[derive(Debug, thiserror::Error)]
#[error("resolving AWS credentials failed: {}", crate::error::chain(.0))]
struct CredentialsFailed(#[source] aws_credential_types::provider::error::CredentialsError);

/// Signs the AWS IoT URL with freshly resolved credentials on every connection attempt.
pub struct IotUrlSigner {
    /// The endpoint host; discovered with DescribeEndpoint on first use when `None`.
    pub host: tokio::sync::Mutex<Option<String>>,
    /// Client for discovery.
    pub discovery: Option<std::sync::Arc<super::SdkIot>>,
    pub region: String,
    pub credentials: SharedCredentialsProvider,
    /// How long a presigned URL is valid for the handshake.
    pub expires: Duration,
    /// `wss` (AWS); `ws` only for local tests against a plain listener.
    pub scheme: String,
}

impl IotUrlSigner {
    async fn host(&self) -> Result<String, SignError> {
        let mut host = self.host.lock().await;
        if let Some(h) = host.as_ref() {
            return Ok(h.clone());
        }
        let client = self.discovery.as_ref().ok_or_else(|| {
            SignError::Endpoint(crate::error::Source::message(
                "no endpoint configured and no client to discover it",
            ))
        })?;
        let found = client
            .describe_endpoint()
            .await
            .map_err(|e| SignError::Endpoint(crate::error::Source::new(e)))?;
        tracing::info!(endpoint = %found, "discovered the AWS IoT data endpoint");
        *host = Some(found.clone());
        Ok(found)
    }
}

impl UrlSigner for IotUrlSigner {
    fn signed_url(&self) -> SignFuture<'_> {
        Box::pin(async move {
            let host = self.host().await?;
            let creds = self.credentials.provide_credentials().await.map_err(|e| {
                SignError::Credentials(crate::error::Source::new(CredentialsFailed(e)))
            })?;
            let mut url =
                presign_iot_url(&host, &self.region, &creds, SystemTime::now(), self.expires)
                    .map_err(|e| SignError::Signing(crate::error::Source::new(e)))?;
            if self.scheme != "wss" {
                url = format!("{}{}", self.scheme, &url[3..]);
            }
            Ok(SignedUrl {
                url: Secret::new(url),
                credentials_expire: creds.expiry(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_last_and_unsigned() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("to+ken/=".into()),
            None,
            "t",
        );
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let with = presign_iot_url(
            "abc-ats.iot.eu-west-1.amazonaws.com",
            "eu-west-1",
            &creds,
            time,
            Duration::from_secs(300),
        )
        .unwrap();
        let without_creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "t",
        );
        let without = presign_iot_url(
            "abc-ats.iot.eu-west-1.amazonaws.com",
            "eu-west-1",
            &without_creds,
            time,
            Duration::from_secs(300),
        )
        .unwrap();
        // Same signature with or without a token: the token is not signed.
        assert!(with.starts_with(&without), "{with}\n{without}");
        assert!(
            with.ends_with("&X-Amz-Security-Token=to%2Bken%2F%3D"),
            "{with}"
        );
        assert!(without.contains("X-Amz-SignedHeaders=host"));
        assert!(without.contains("X-Amz-Credential=AKIDEXAMPLE%2F20231114%2Feu-west-1%2Fiotdevicegateway%2Faws4_request"), "{without}");
        assert!(!without.contains("Security-Token"));
    }

    #[test]
    fn rejects_hosts_with_paths() {
        let creds = Credentials::new("a", "b", None, None, "t");
        assert!(
            presign_iot_url(
                "h/x",
                "eu-west-1",
                &creds,
                SystemTime::now(),
                Duration::from_secs(1)
            )
            .is_err()
        );
    }
}
