//! Switches read from the environment, for the engine, the device and the CLI alike:
//! `XATTN_AUTOTUNE` ([`autotune`]) and `XATTN_MATRIX_UNITS` ([`matrix_units`]). The autotune
//! cache's folder (`XATTN_CACHE_DIR`) is [`crate::tune::cache_dir`]'s.

/// Whether `XATTN_AUTOTUNE` turns autotuning on (`1`) or off (`0`); `None` where unset or
/// not one of `0`, `1`, `true`, `false`, `on`, `off` (the caller's default applies).
pub fn autotune() -> Option<bool> {
    switch(&std::env::var("XATTN_AUTOTUNE").ok()?)
}

/// Whether `XATTN_MATRIX_UNITS` asks for the adapter's matrix units (wgpu's experimental
/// cooperative matrices; see [`crate::FusedConfig::MATRIX_UNITS`]): `1`, `true` or `on`.
pub fn matrix_units() -> bool {
    std::env::var("XATTN_MATRIX_UNITS")
        .ok()
        .and_then(|v| switch(&v))
        .unwrap_or(false)
}

/// `1`, `true`, `on` → on; `0`, `false`, `off` → off (any case, surrounding blanks ignored).
pub fn switch(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" => Some(true),
        "0" | "false" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::switch;

    #[test]
    fn settings_parse() {
        for (v, want) in [
            ("1", Some(true)),
            (" ON ", Some(true)),
            ("0", Some(false)),
            ("false", Some(false)),
            ("", None),
            ("2", None),
        ] {
            assert_eq!(switch(v), want, "{v:?}");
        }
    }
}
