package command

// ValidationError says which field of a stop command broke which rule. Field
// is the JSON name of the field, or "body" when the body as a whole is
// unusable (too large, not UTF-8, not JSON, not an object). Rule is a short
// English phrase that never quotes the offending value, so it is safe to put
// into an outcome's detail or a NATS header.
type ValidationError struct {
	Field string
	Rule  string
}

// Error returns "<field>: <rule>", e.g. `script_name: must not be "." or ".."`.
func (e *ValidationError) Error() string {
	return e.Field + ": " + e.Rule
}

// Rules, as reported in ValidationError.Rule.
const (
	ruleDuplicate  = "must not appear more than once"
	ruleString     = "must be a string"
	ruleRequired   = "is required"
	ruleID         = "must be 1-128 characters of A-Z a-z 0-9 . _ : -"
	ruleToken64    = "must be 1-64 characters of A-Z a-z 0-9 -"
	ruleToken128   = "must be 1-128 characters of A-Z a-z 0-9 -"
	ruleScript     = "must be 1-128 characters, each a letter, a digit 0-9, '_', '-' or '.'"
	ruleDots       = `must not be "." or ".."`
	ruleDeadline   = "must be an RFC 3339 time, e.g. 2006-01-02T15:04:05Z"
	ruleReason     = "must be at most 1024 bytes"
	ruleNoProject  = "is required: the command has none and HUAWEICLOUD_SDK_PROJECT_ID is not set"
	ruleDefProject = "default HUAWEICLOUD_SDK_PROJECT_ID " + ruleToken64
	ruleDefWS      = "default DLF_WORKSPACE " + ruleToken64
	ruleUTF8       = "must be valid UTF-8"
	ruleEmpty      = "must be a JSON object, not empty"
)
