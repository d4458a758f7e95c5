package command

import (
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Field limits from contract section 3.
const (
	maxIDLen       = 128
	maxProjectLen  = 64
	maxWSLen       = 64
	maxScriptLen   = 128 // characters (runes)
	maxInstanceLen = 128
	maxReasonBytes = 1024
)

// ValidID reports whether s follows the command_id rule: 1-128 characters of
// A-Z a-z 0-9 . _ : -.
func ValidID(s string) bool {
	if len(s) == 0 || len(s) > maxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isIDByte(s[i]) {
			return false
		}
	}
	return true
}

func isIDByte(c byte) bool {
	return isTokenByte(c) || c == '.' || c == '_' || c == ':'
}

// isTokenByte is the charset of project_id, workspace and instance_id.
func isTokenByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-'
}

// validToken reports whether s is 1-max characters of A-Z a-z 0-9 -. The
// charset is ASCII, so bytes and characters count the same.
func validToken(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isTokenByte(s[i]) {
			return false
		}
	}
	return true
}

// validScriptChars reports whether s is 1-128 characters, each a Unicode
// letter, a digit 0-9, '_', '-' or '.'. s must be valid UTF-8 (everything
// Decode reads is).
func validScriptChars(s string) bool {
	if len(s) == 0 || len(s) > maxScriptLen*utf8.UTFMax {
		return false
	}
	n := 0
	for _, r := range s {
		n++
		if n > maxScriptLen {
			return false
		}
		switch {
		case r < utf8.RuneSelf:
			c := byte(r)
			if !isTokenByte(c) && c != '_' && c != '.' {
				return false
			}
		case !unicode.IsLetter(r):
			return false
		}
	}
	return true
}

// parseDeadline parses an RFC 3339 time with time.RFC3339Nano, after
// checking the exact RFC 3339 shape, since Go accepts more: a one-digit hour,
// a comma before the fraction, offsets such as +24:00 or +01:60.
func parseDeadline(s string) (time.Time, bool) {
	if !rfc3339Shape(s) {
		return time.Time{}, false
	}
	// RFC 3339 section 5.6 allows a lower-case "t" and "z"; Go takes only
	// upper case. After the shape check no other letter is left to change.
	s = strings.ToUpper(s)
	t, err := time.Parse(time.RFC3339Nano, s) // checks the ranges of date and time
	if err != nil {
		return time.Time{}, false
	}
	return t, true
}

// rfc3339Shape reports whether s is "YYYY-MM-DDTHH:MM:SS", an optional "."
// with one or more digits, then "Z" or "+hh:mm"/"-hh:mm" with hh <= 23 and
// mm <= 59; "T" and "Z" may be lower case. Ranges of the date and time are
// left to time.Parse.
func rfc3339Shape(s string) bool {
	const head = "dddd-dd-ddTdd:dd:dd"
	if len(s) < len(head)+1 {
		return false
	}
	for i := 0; i < len(head); i++ {
		switch head[i] {
		case 'd':
			if !isDigit(s[i]) {
				return false
			}
		case 'T':
			if s[i] != 'T' && s[i] != 't' {
				return false
			}
		default:
			if s[i] != head[i] {
				return false
			}
		}
	}
	rest := s[len(head):]
	if rest[0] == '.' {
		n := 1
		for n < len(rest) && isDigit(rest[n]) {
			n++
		}
		if n == 1 {
			return false
		}
		rest = rest[n:]
	}
	if rest == "Z" || rest == "z" {
		return true
	}
	return len(rest) == 6 && (rest[0] == '+' || rest[0] == '-') &&
		isDigit(rest[1]) && isDigit(rest[2]) && rest[3] == ':' && isDigit(rest[4]) && isDigit(rest[5]) &&
		(rest[1] < '2' || rest[1] == '2' && rest[2] <= '3') && rest[4] <= '5'
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// Validate reports whether the configured defaults follow the rules of the
// fields they stand in for; an empty default means "none". A default that
// breaks its rule makes Decode reject every command relying on it.
func (d Defaults) Validate() error {
	if d.ProjectID != "" && !validToken(d.ProjectID, maxProjectLen) {
		return &ValidationError{Field: "project_id", Rule: ruleDefProject}
	}
	if d.Workspace != "" && !validToken(d.Workspace, maxWSLen) {
		return &ValidationError{Field: "workspace", Rule: ruleDefWS}
	}
	return nil
}
