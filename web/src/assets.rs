//! The page's files, embedded at build time from `web/ui/dist/` (see `build.rs`), and how each
//! is served: its content type and how long a browser may cache it.

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// One embedded file as it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// The bytes.
    pub bytes: &'static [u8],
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The `Cache-Control` header.
    pub cache_control: &'static str,
}

/// Hashed build outputs under `/assets/` never change under one name: cached for a year.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Everything else (`index.html` above all, which names the current hashed files) is checked
/// with the server on every use, so a new binary's page is picked up at once.
pub const NO_CACHE: &str = "no-cache";

/// The file served for URL `path` (without its query): `/` is `/index.html`.
pub fn lookup(path: &str) -> Option<Asset> {
    let path = if path == "/" { "/index.html" } else { path };
    let (_, bytes) = FILES.iter().find(|(p, _)| *p == path)?;
    Some(Asset {
        bytes,
        content_type: content_type(path),
        cache_control: if path.starts_with("/assets/") {
            IMMUTABLE
        } else {
            NO_CACHE
        },
    })
}

/// The embedded files' URL paths.
pub fn paths() -> impl Iterator<Item = &'static str> {
    FILES.iter().map(|(p, _)| *p)
}

/// The content type of a file, by its extension; unknown ones are served as bytes (with
/// `nosniff`, a browser then neither runs nor renders them).
pub fn content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_embedded_and_served_uncached() {
        let index = lookup("/").expect("index.html");
        assert_eq!(Some(index), lookup("/index.html"));
        assert_eq!(index.content_type, "text/html; charset=utf-8");
        assert_eq!(index.cache_control, NO_CACHE);
        assert!(
            String::from_utf8_lossy(index.bytes).contains("<html"),
            "index.html"
        );
        assert_eq!(lookup("/nope.js"), None);
        assert_eq!(lookup(""), None);
        for path in paths() {
            assert!(lookup(path).is_some(), "{path}");
            if path.starts_with("/assets/") {
                assert_eq!(lookup(path).map(|a| a.cache_control), Some(IMMUTABLE));
            }
        }
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(
            content_type("/assets/index-abc.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("/assets/x.CSS"), "text/css; charset=utf-8");
        assert_eq!(content_type("/favicon.svg"), "image/svg+xml");
        assert_eq!(content_type("/noext"), "application/octet-stream");
    }
}
