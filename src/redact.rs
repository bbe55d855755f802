//! Request targets as they may appear in logs: the path as sent, and the query with the
//! values of credential-bearing parameters replaced.

use std::fmt;

use http::Uri;

/// Query parameter names whose values are credentials, compared case-insensitively.
/// Object-storage presigned URLs (S3 `X-Amz-Signature`, `X-Amz-Credential`, GCS
/// `X-Goog-Signature`, Azure `sig`) and OAuth-style tokens are covered. Distribution's
/// `_state` is an HMAC-signed upload state, not a credential, so it stays readable.
const SECRET_PARAMETERS: &[&str] = &[
    "access_token",
    "auth",
    "code",
    "id_token",
    "key",
    "password",
    "refresh_token",
    "secret",
    "sig",
    "signature",
    "token",
    "x-amz-credential",
    "x-amz-security-token",
    "x-amz-signature",
    "x-goog-credential",
    "x-goog-signature",
];

const REDACTED: &str = "REDACTED";

/// Formats a request target for logs without its secrets. Formatting allocates nothing,
/// so a disabled log event costs nothing.
pub struct LoggedTarget<'a>(pub &'a Uri);

impl fmt::Display for LoggedTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.path())?;
        let Some(query) = self.0.query() else {
            return Ok(());
        };
        f.write_str("?")?;
        for (index, pair) in query.split('&').enumerate() {
            if index > 0 {
                f.write_str("&")?;
            }
            match pair.split_once('=') {
                Some((name, _)) if is_secret(name) => write!(f, "{name}={REDACTED}")?,
                _ => f.write_str(pair)?,
            }
        }
        Ok(())
    }
}

/// Returns whether a raw (still percent-encoded) parameter name carries a credential.
fn is_secret(name: &str) -> bool {
    // A name written with percent-escapes is rare and may hide a secret name, so its
    // value is hidden too. Decoding every name on every logged request would cost more.
    name.contains('%')
        || SECRET_PARAMETERS
            .iter()
            .any(|secret| name.eq_ignore_ascii_case(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(target: &str) -> String {
        LoggedTarget(&target.parse().unwrap()).to_string()
    }

    #[test]
    fn secret_values_are_redacted() {
        let cases = [
            ("/v2/", "/v2/"),
            ("/service/token?service=harbor&scope=repository:a/b:pull", "/service/token?service=harbor&scope=repository:a/b:pull"),
            ("/x?access_token=abc&n=5", "/x?access_token=REDACTED&n=5"),
            ("/x?n=5&Token=abc", "/x?n=5&Token=REDACTED"),
            ("/blob?X-Amz-Signature=abc&X-Amz-Credential=def&X-Amz-Date=1", "/blob?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Date=1"),
            ("/x?%74oken=abc", "/x?%74oken=REDACTED"),
            ("/v2/a/blobs/uploads/u?_state=xyz%3D&digest=sha256:00", "/v2/a/blobs/uploads/u?_state=xyz%3D&digest=sha256:00"),
            ("/x?password", "/x?password"),
            ("/x?", "/x?"),
        ];
        for (target, expected) in cases {
            assert_eq!(logged(target), expected, "{target}");
        }
    }
}
