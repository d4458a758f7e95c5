// Package command decodes and validates stop commands, the JSON messages a
// scheduler publishes to the stop subject (contract section 3).
//
// [Decode] is the only way in: it takes the message body and what the
// envelope says about it ([Meta]), applies the worker's [Defaults], and
// returns a [Command] that satisfies every rule, or a [*ValidationError]
// naming the first field (in the fixed order body, command_id, project_id,
// workspace, script_name, instance_id, deadline, reason) that broke which
// rule. Even on error the returned Command carries a valid ID and every field
// that was read and passed its rule, so the rejection outcome can echo them.
//
// # Decisions beyond the contract text
//
//   - Keys match exactly (case-sensitive), unlike encoding/json's
//     case-insensitive struct matching: "Script_Name" is an unknown field and
//     ignored. Escaped keys ("script\u005fname") are unescaped before matching.
//   - A known key that appears more than once is rejected ("must not appear
//     more than once"), so no two JSON parsers can disagree on what the
//     command says. Repeated unknown keys are ignored.
//   - Invalid UTF-8 anywhere in the body rejects it (field "body");
//     encoding/json would silently replace the bytes with U+FFFD. Escaped lone
//     surrogates ("\ud800") are valid JSON and decode to U+FFFD as in
//     encoding/json; U+FFFD is no letter, so no path field can hold one.
//   - Nesting is limited by encoding/json's scanner (10000 levels); a deeper
//     body is rejected as invalid JSON. Decode itself never recurses.
//   - deadline must have the exact RFC 3339 shape and parse with
//     time.RFC3339Nano; Go alone is more lenient (a one-digit hour, a comma
//     before the fraction, an offset such as +24:00 or +01:60), and those are
//     rejected. A lower-case "t" and "z", which RFC 3339 section 5.6 allows
//     and Go does not, are accepted: "2030-01-02t03:04:05z" is the same
//     instant as "2030-01-02T03:04:05Z". A leap second (":60"), which RFC
//     3339 also allows, is rejected: time.Time cannot represent it.
//   - reason's 1024-byte limit applies to the decoded string (escapes such as
//     "\u00e9" count as the two bytes of é).
//   - The body command_id is validated even on a redrive (Dlf-Redrive-Of),
//     where it is not used as the id: whether a body is valid does not depend
//     on its envelope, so a redriven body is judged as it was the first time.
//   - A configured default that breaks its field's rule rejects commands that
//     rely on it; [Defaults.Validate] lets the worker refuse such a
//     configuration at start.
//   - On a body-level error (too large, not UTF-8, not a JSON object) nothing
//     was read, so the returned Command holds only the ID; defaults are
//     applied only once the body has been read as an object.
//   - The fallback id "<stream>-<seq>" always satisfies the command_id rule:
//     stream-name bytes outside that rule's charset become '_' and an over-long
//     stream name is cut so the sequence survives. Stream names made of
//     A-Z a-z 0-9 . _ : - (such as DLF_STOP) are used unchanged.
package command
