package command

import (
	"bytes"
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// Indexes of the known fields, in the order errors are reported.
const (
	fCommandID = iota
	fProjectID
	fWorkspace
	fScriptName
	fInstanceID
	fDeadline
	fReason
	numFields
)

var fieldNames = [numFields]string{
	"command_id", "project_id", "workspace", "script_name", "instance_id", "deadline", "reason",
}

func fieldIndex(name string) int {
	switch name {
	case "command_id":
		return fCommandID
	case "project_id":
		return fProjectID
	case "workspace":
		return fWorkspace
	case "script_name":
		return fScriptName
	case "instance_id":
		return fInstanceID
	case "deadline":
		return fDeadline
	case "reason":
		return fReason
	}
	return -1
}

// rawFields holds the raw JSON value of each known top-level member (a
// sub-slice of the body, nil when absent) and whether it appeared twice.
type rawFields struct {
	val [numFields][]byte
	dup [numFields]bool
}

// str interprets field f: ok reports a non-empty string; rule is non-empty
// when the field breaks a type rule. An absent field, null and "" are all
// absent (ok false, rule "").
func (r *rawFields) str(f int) (s string, ok bool, rule string) {
	if r.dup[f] {
		return "", false, ruleDuplicate
	}
	v := r.val[f]
	if v == nil || v[0] == 'n' { // absent or null
		return "", false, ""
	}
	if v[0] != '"' {
		return "", false, ruleString
	}
	s, good := unquote(v)
	if !good {
		return "", false, ruleString // unreachable: the body was validated
	}
	return s, s != "", ""
}

// unquote decodes a JSON string literal taken from a validated body. Without
// escapes the bytes are already valid UTF-8 with no control characters, so
// they are copied as they are; otherwise encoding/json does the unescaping.
func unquote(lit []byte) (string, bool) {
	inner := lit[1 : len(lit)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return string(inner), true
	}
	var s string
	if err := json.Unmarshal(lit, &s); err != nil {
		return "", false
	}
	return s, true
}

// scanBody checks the body as a whole and collects the known top-level
// members. It recurses nowhere: json.Valid's scanner is iterative and limits
// nesting, and the walk below only counts brackets.
func scanBody(body []byte, r *rawFields) *ValidationError {
	if len(body) > MaxBodySize {
		return &ValidationError{Field: "body", Rule: "must be at most " +
			strconv.Itoa(MaxBodySize) + " bytes, has " + strconv.Itoa(len(body))}
	}
	if !utf8.Valid(body) {
		return &ValidationError{Field: "body", Rule: ruleUTF8}
	}
	start := skipSpace(body, 0)
	if start == len(body) {
		return &ValidationError{Field: "body", Rule: ruleEmpty}
	}
	if !json.Valid(body) {
		return &ValidationError{Field: "body", Rule: syntaxRule(body)}
	}
	if body[start] != '{' {
		return &ValidationError{Field: "body", Rule: "must be a JSON object, not " + kindOf(body[start])}
	}
	if !walkObject(body, start, r) {
		// Unreachable for a body json.Valid accepted; kept so a bug here
		// rejects instead of panicking.
		return &ValidationError{Field: "body", Rule: "must be valid JSON"}
	}
	return nil
}

// syntaxRule explains why body is not valid JSON, using encoding/json's
// error (deterministic, and it quotes bytes safely). Only on the error path.
func syntaxRule(body []byte) string {
	var raw json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		return "must be valid JSON: " + err.Error()
	}
	return "must be valid JSON"
}

func kindOf(c byte) string {
	switch c {
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// walkObject walks the members of the object starting at b[i] == '{' in a
// body that json.Valid accepted, recording the known ones in r. Every index
// is bounds-checked so a broken assumption returns false, never panics.
func walkObject(b []byte, i int, r *rawFields) bool {
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return true
	}
	for i < len(b) {
		if b[i] != '"' {
			return false
		}
		kEnd := skipString(b, i)
		if kEnd < 0 {
			return false
		}
		key := b[i:kEnd]
		i = skipSpace(b, kEnd)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		i = skipSpace(b, i+1)
		vEnd := skipValue(b, i)
		if vEnd <= i {
			return false
		}
		if f := keyIndex(key); f >= 0 {
			if r.val[f] != nil {
				r.dup[f] = true
			}
			r.val[f] = b[i:vEnd]
		}
		i = skipSpace(b, vEnd)
		if i >= len(b) {
			return false
		}
		switch b[i] {
		case '}':
			return true
		case ',':
			i = skipSpace(b, i+1)
		default:
			return false
		}
	}
	return false
}

// keyIndex maps a quoted key to its field index, -1 for unknown keys.
func keyIndex(lit []byte) int {
	inner := lit[1 : len(lit)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return fieldIndex(string(inner)) // no allocation: compiler optimizes the conversion
	}
	s, ok := unquote(lit)
	if !ok {
		return -1
	}
	return fieldIndex(s)
}

// skipString returns the index just past the string literal at b[i] == '"',
// or -1.
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return -1
}

// skipValue returns the index just past the JSON value starting at b[i], or
// -1. Containers are skipped by counting brackets outside strings, so depth
// costs no stack.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				if i < 0 {
					return -1
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	}
	// Number or literal: runs up to a delimiter.
	j := i
	for j < len(b) {
		switch b[j] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return j
		}
		j++
	}
	return j
}
