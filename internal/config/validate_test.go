package config

import (
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestFromEnvInvalid(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, "f", "x")
	empty := writeFile(t, "empty", "")
	missing := filepath.Join(dir, "missing")
	tests := []struct {
		name string
		env  map[string]string
		want string // the whole "VAR: problem" or a prefix of it
	}{
		{"bad duration", env("DLF_TIMEOUT", "x"), `DLF_TIMEOUT: invalid duration "x"`},
		{"zero duration", env("DLF_TIMEOUT", "0s"), "DLF_TIMEOUT: must be > 0"},
		{"negative duration", env("SHUTDOWN_TIMEOUT", "-1s"), "SHUTDOWN_TIMEOUT: must be > 0"},
		{"retry initial", env("RETRY_INITIAL_INTERVAL", "soon"), `RETRY_INITIAL_INTERVAL: invalid duration "soon"`},
		{"retry max below initial", env("RETRY_INITIAL_INTERVAL", "1m", "RETRY_MAX_INTERVAL", "30s"), "RETRY_MAX_INTERVAL: must be >= RETRY_INITIAL_INTERVAL"},
		{"retry max elapsed", env("RETRY_MAX_ELAPSED", "0"), "RETRY_MAX_ELAPSED: must be > 0"},
		{"state ttl", env("STATE_TTL", "1d"), `STATE_TTL: invalid duration "1d"`},
		{"state ttl below max elapsed", env("STATE_TTL", "5m"), "STATE_TTL: must be >= RETRY_MAX_ELAPSED"},
		{"concurrency not a number", env("WORKER_CONCURRENCY", "many"), `WORKER_CONCURRENCY: invalid integer "many"`},
		{"concurrency 0", env("WORKER_CONCURRENCY", "0"), "WORKER_CONCURRENCY: must be between 1 and 4096, got 0"},
		{"concurrency 4097", env("WORKER_CONCURRENCY", "4097"), "WORKER_CONCURRENCY: must be between 1 and 4096, got 4097"},
		{"replicas 0", env("STREAM_REPLICAS", "0"), "STREAM_REPLICAS: must be between 1 and 5"},
		{"replicas 6", env("STREAM_REPLICAS", "6"), "STREAM_REPLICAS: must be between 1 and 5"},
		{"replicas text", env("STREAM_REPLICAS", "three"), `STREAM_REPLICAS: invalid integer "three"`},
		{"rate text", env("DLF_RATE_LIMIT", "fast"), `DLF_RATE_LIMIT: invalid number "fast"`},
		{"rate NaN", env("DLF_RATE_LIMIT", "NaN"), `DLF_RATE_LIMIT: invalid number "NaN"`},
		{"rate negative", env("DLF_RATE_LIMIT", "-1"), "DLF_RATE_LIMIT: must be >= 0"},
		{"burst negative", env("DLF_RATE_BURST", "-1"), "DLF_RATE_BURST: must be >= 0"},
		{"burst text", env("DLF_RATE_BURST", "1.5"), `DLF_RATE_BURST: invalid integer "1.5"`},
		{"log level", env("LOG_LEVEL", "verbose"), `LOG_LEVEL: unknown level "verbose"`},
		{"log format", env("LOG_FORMAT", "xml"), `LOG_FORMAT: must be json or console, got "xml"`},
		{"http addr", env("HTTP_ADDR", "8080"), `HTTP_ADDR: invalid address "8080"`},
		{"http port", env("HTTP_ADDR", ":http"), `HTTP_ADDR: invalid port in ":http"`},

		{"no endpoint", env("DLF_REGION", "<unset>"), "DLF_ENDPOINT: not set; set DLF_ENDPOINT or DLF_REGION"},
		{"bad region", env("DLF_REGION", "cn north/4"), `DLF_REGION: invalid region "cn north/4"`},
		{"relative endpoint", env("DLF_ENDPOINT", "dlf.example.com"), "DLF_ENDPOINT: must be an absolute URL"},
		{"endpoint port only", env("DLF_ENDPOINT", "https://:443"), "DLF_ENDPOINT: must be an absolute URL"},
		{"endpoint dot segment", env("DLF_ENDPOINT", "https://gw.example.com/a/../b"), "DLF_ENDPOINT: path must not have empty, '.' or '..' segments"},
		{"endpoint empty segment", env("DLF_ENDPOINT", "https://gw.example.com/a//b"), "DLF_ENDPOINT: path must not have empty, '.' or '..' segments"},
		{"endpoint space in path", env("DLF_ENDPOINT", "https://gw.example.com/a b"), "DLF_ENDPOINT: path may hold only A-Z a-z 0-9 _ - ~ . and '/'"},
		{"endpoint escape in path", env("DLF_ENDPOINT", "https://gw.example.com/a~b%20c"), "DLF_ENDPOINT: path may hold only A-Z a-z 0-9 _ - ~ . and '/'"},
		{"endpoint escaped slash", env("DLF_ENDPOINT", "https://gw.example.com/a%2Fb"), "DLF_ENDPOINT: path may hold only A-Z a-z 0-9 _ - ~ . and '/'"},
		{"endpoint not a URL", env("DLF_ENDPOINT", "https://[::1"), `DLF_ENDPOINT: "https://[::1" is not a valid URL`},
		{"endpoint scheme", env("DLF_ENDPOINT", "ftp://dlf.example.com"), "DLF_ENDPOINT: scheme must be https"},
		{"endpoint http remote", env("DLF_ENDPOINT", "http://dlf.example.com"), "DLF_ENDPOINT: plain http is allowed only for loopback hosts"},
		{"endpoint http private ip", env("DLF_ENDPOINT", "http://10.0.0.1:8080"), "DLF_ENDPOINT: plain http is allowed only for loopback hosts"},
		{"endpoint http localhost lookalike", env("DLF_ENDPOINT", "http://localhost.example.com"), "DLF_ENDPOINT: plain http is allowed only for loopback hosts"},
		{"endpoint query", env("DLF_ENDPOINT", "https://dlf.example.com/?a=b"), `DLF_ENDPOINT: must not have a query or fragment, got "https://dlf.example.com/?[not shown]"`},
		// What a query or fragment holds is never shown: it may be a token.
		{"endpoint query token", env("DLF_ENDPOINT", "http://dlf.example.com/?X-Auth-Token=MIIsecretTOKEN"), `DLF_ENDPOINT: plain http is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost), got "http://dlf.example.com/?[not shown]"`},
		{"endpoint fragment token", env("DLF_ENDPOINT", "https://[::1#MIIsecretTOKEN"), `DLF_ENDPOINT: "https://[not shown]" is not a valid URL`},
		// A '?' or '#' inside a password is not where the query begins.
		{"endpoint password with ?", env("DLF_ENDPOINT", "https://user:S3cr?etPass@dlf.example.com/?a=b"), `DLF_ENDPOINT: "https://[not shown]" is not a valid URL`},
		{"endpoint password with #", env("DLF_ENDPOINT", "https://user:S3cr#etPass@dlf.example.com"), `DLF_ENDPOINT: "https://[not shown]" is not a valid URL`},
		// An '@' or a second URL inside the query is the query's.
		{"endpoint query with @", env("DLF_ENDPOINT", "https://dlf.example.com/?password=p@SECRET"), `DLF_ENDPOINT: must not have a query or fragment, got "https://dlf.example.com/?[not shown]"`},
		{"endpoint fragment with @", env("DLF_ENDPOINT", "https://dlf.example.com/#frag@SECRET"), `DLF_ENDPOINT: must not have a query or fragment, got "https://dlf.example.com/?[not shown]"`},
		{"endpoint query with a URL", env("DLF_ENDPOINT", "https://dlf.example.com/?t=SECRET,https://h@x"), `DLF_ENDPOINT: must not have a query or fragment, got "https://dlf.example.com/?[not shown]"`},
		{"endpoint userinfo", env("DLF_ENDPOINT", "https://u:p@dlf.example.com"), `DLF_ENDPOINT: must not contain credentials ("https://[redacted]@dlf.example.com")`},

		{"ak without sk", env("HUAWEICLOUD_SDK_AK", "AK"), "HUAWEICLOUD_SDK_SK: required when HUAWEICLOUD_SDK_AK is set"},
		{"sk without ak", env("HUAWEICLOUD_SDK_SK", "sk"), "HUAWEICLOUD_SDK_AK: required when HUAWEICLOUD_SDK_SK is set"},
		{"sk file without ak", env("HUAWEICLOUD_SDK_SK_FILE", file), "HUAWEICLOUD_SDK_AK: required when HUAWEICLOUD_SDK_SK is set"},
		{"aksk and token", env("HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK", "sk", "DLF_AUTH_TOKEN", "t"), "DLF_AUTH_TOKEN: cannot be combined with HUAWEICLOUD_SDK_AK/HUAWEICLOUD_SDK_SK"},
		{"aksk files and token file", env("HUAWEICLOUD_SDK_AK_FILE", file, "HUAWEICLOUD_SDK_SK_FILE", file, "DLF_AUTH_TOKEN_FILE", file), "DLF_AUTH_TOKEN: cannot be combined with HUAWEICLOUD_SDK_AK/HUAWEICLOUD_SDK_SK"},
		{"ak and ak file", env("HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_AK_FILE", file, "HUAWEICLOUD_SDK_SK", "sk"), "HUAWEICLOUD_SDK_AK: cannot be combined with HUAWEICLOUD_SDK_AK_FILE"},
		{"sk and sk file", env("HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK", "sk", "HUAWEICLOUD_SDK_SK_FILE", file), "HUAWEICLOUD_SDK_SK: cannot be combined with HUAWEICLOUD_SDK_SK_FILE"},
		{"token and token file", env("DLF_AUTH_TOKEN", "t", "DLF_AUTH_TOKEN_FILE", file), "DLF_AUTH_TOKEN: cannot be combined with DLF_AUTH_TOKEN_FILE"},
		{"security token alone", env("HUAWEICLOUD_SDK_SECURITY_TOKEN", "st"), "HUAWEICLOUD_SDK_SECURITY_TOKEN: requires HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK"},
		{"security token with aksk files", env("HUAWEICLOUD_SDK_AK_FILE", file, "HUAWEICLOUD_SDK_SK_FILE", file, "HUAWEICLOUD_SDK_SECURITY_TOKEN", "st"),
			"HUAWEICLOUD_SDK_SECURITY_TOKEN: cannot be combined with HUAWEICLOUD_SDK_AK_FILE or HUAWEICLOUD_SDK_SK_FILE"},
		{"security token with sk file", env("HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK_FILE", file, "HUAWEICLOUD_SDK_SECURITY_TOKEN", "st"),
			"HUAWEICLOUD_SDK_SECURITY_TOKEN: cannot be combined with HUAWEICLOUD_SDK_AK_FILE or HUAWEICLOUD_SDK_SK_FILE"},
		{"sk file missing", env("HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK_FILE", missing), "HUAWEICLOUD_SDK_SK_FILE: cannot open the file it names (value not shown): no such file or directory"},
		{"ak file empty", env("HUAWEICLOUD_SDK_AK_FILE", empty, "HUAWEICLOUD_SDK_SK", "sk"), fmt.Sprintf("HUAWEICLOUD_SDK_AK_FILE: %q is empty", empty)},
		{"token file is a directory", env("DLF_AUTH_TOKEN_FILE", dir), fmt.Sprintf("DLF_AUTH_TOKEN_FILE: %q is not a regular file", dir)},
		{"project id", env("HUAWEICLOUD_SDK_PROJECT_ID", "a/b"), `HUAWEICLOUD_SDK_PROJECT_ID: must be 1-64 characters of A-Z a-z 0-9 -, got "a/b"`},
		{"project id too long", env("HUAWEICLOUD_SDK_PROJECT_ID", strings.Repeat("a", 65)), "HUAWEICLOUD_SDK_PROJECT_ID: must be 1-64 characters"},
		{"workspace", env("DLF_WORKSPACE", "w s"), `DLF_WORKSPACE: must be 1-64 characters of A-Z a-z 0-9 -, got "w s"`},

		{"nats url scheme", env("NATS_URL", "http://127.0.0.1:4222"), `NATS_URL: "http://127.0.0.1:4222": scheme must be nats, tls, ws or wss`},
		{"nats url empty entry", env("NATS_URL", "nats://a:4222,,nats://b:4222"), "NATS_URL: empty entry in the list"},
		{"nats url no host", env("NATS_URL", "nats://:4222"), `NATS_URL: "nats://:4222" has no host`},
		{"nats url bad port", env("NATS_URL", "nats://a:port"), `NATS_URL: "nats://a:port" is not a valid URL`},
		{"nats two methods", env("NATS_TOKEN", "t", "NATS_CREDS", file), "NATS_TOKEN, NATS_CREDS: set only one NATS authentication method"},
		{"nats user and nkey", env("NATS_USER", "u", "NATS_PASSWORD", "p", "NATS_NKEY", file), "NATS_USER, NATS_NKEY: set only one NATS authentication method"},
		{"nats url user and password file", env("NATS_URL", "nats://u:p@h:4222", "NATS_USER", "u", "NATS_PASSWORD_FILE", file),
			`NATS_URL: carries a user name and password or a token, and NATS_USER, NATS_PASSWORD_FILE set credentials as well`},
		{"nats url token and nkey", env("NATS_URL", "nats://a:4222, tok@b:4222", "NATS_NKEY", file),
			"NATS_URL: carries a user name and password or a token, and NATS_NKEY set credentials as well: nats.go would send the URL's"},
		{"nats user without password", env("NATS_USER", "u"), "NATS_PASSWORD: required when NATS_USER is set"},
		{"nats password without user", env("NATS_PASSWORD", "p"), "NATS_USER: required when NATS_PASSWORD or NATS_PASSWORD_FILE is set"},
		{"nats password and file", env("NATS_USER", "u", "NATS_PASSWORD", "p", "NATS_PASSWORD_FILE", file), "NATS_PASSWORD: cannot be combined with NATS_PASSWORD_FILE"},
		{"nats password file missing", env("NATS_USER", "u", "NATS_PASSWORD_FILE", missing), "NATS_PASSWORD_FILE: cannot open the file it names"},
		{"nats cert without key", env("NATS_CERT", file), "NATS_KEY: required when NATS_CERT is set"},
		{"nats key without cert", env("NATS_KEY", file), "NATS_CERT: required when NATS_KEY is set"},
		{"nats ca missing", env("NATS_CA", missing), "NATS_CA: cannot open the file it names"},
		{"nats creds missing", env("NATS_CREDS", missing), "NATS_CREDS: cannot open the file it names"},
		{"nats nkey empty", env("NATS_NKEY", empty), fmt.Sprintf("NATS_NKEY: %q is empty", empty)},
		{"nats cert missing", env("NATS_CERT", missing, "NATS_KEY", file), "NATS_CERT: cannot open the file it names"},
		{"nats key missing", env("NATS_CERT", file, "NATS_KEY", missing), "NATS_KEY: cannot open the file it names"},

		{"stop subject wildcard", env("STOP_SUBJECT", "dlf.*"), `STOP_SUBJECT: must not contain wildcards ('*' or '>'), got "dlf.*"`},
		{"stop subject gt", env("STOP_SUBJECT", "dlf.>"), "STOP_SUBJECT: must not contain wildcards"},
		{"stop subject space", env("STOP_SUBJECT", "dlf stop"), "STOP_SUBJECT: must not contain whitespace"},
		{"stop subject empty token", env("STOP_SUBJECT", "dlf..stop"), "STOP_SUBJECT: must be non-empty tokens separated by '.'"},
		{"stop subject leading dot", env("STOP_SUBJECT", ".dlf"), "STOP_SUBJECT: must be non-empty tokens separated by '.'"},
		{"dead subject wildcard", env("DEAD_SUBJECT", "*"), "DEAD_SUBJECT: must not contain wildcards"},
		{"dead subject control", env("DEAD_SUBJECT", "a\x01b"), "DEAD_SUBJECT: must not contain whitespace or control characters"},
		{"outcome prefix trailing dot", env("OUTCOME_SUBJECT_PREFIX", "dlf.out."), `OUTCOME_SUBJECT_PREFIX: must not end with '.'`},
		{"outcome prefix wildcard", env("OUTCOME_SUBJECT_PREFIX", "dlf.>"), "OUTCOME_SUBJECT_PREFIX: must not contain wildcards"},
		{"stop equals dead", env("DEAD_SUBJECT", "dlf.stop.request"), `DEAD_SUBJECT: must differ from STOP_SUBJECT (both "dlf.stop.request")`},
		{"stop inside outcomes", env("STOP_SUBJECT", "dlf.stop.outcome.x"), `STOP_SUBJECT: "dlf.stop.outcome.x" overlaps the outcome subjects dlf.stop.outcome.*`},
		{"dead inside outcomes", env("DEAD_SUBJECT", "dlf.stop.outcome.failed"), "DEAD_SUBJECT: \"dlf.stop.outcome.failed\" overlaps the outcome subjects"},
		{"stop stream dot", env("STOP_STREAM", "DLF.STOP"), `STOP_STREAM: must not contain whitespace, control characters, '.', '*', '>', '/' or '\', got "DLF.STOP"`},
		{"outcome stream space", env("OUTCOME_STREAM", "A B"), "OUTCOME_STREAM: must not contain whitespace"},
		{"dead stream slash", env("DEAD_STREAM", "A/B"), "DEAD_STREAM: must not contain"},
		{"dead stream backslash", env("DEAD_STREAM", `A\B`), "DEAD_STREAM: must not contain"},
		{"stream too long", env("STOP_STREAM", strings.Repeat("S", 256)), "STOP_STREAM: must be at most 255 bytes"},
		{"consumer star", env("CONSUMER_NAME", "w*"), "CONSUMER_NAME: must not contain"},
		{"consumer gt", env("CONSUMER_NAME", "w>"), "CONSUMER_NAME: must not contain"},
		{"bucket dot", env("STATE_BUCKET", "a.b"), `STATE_BUCKET: must be 1-252 characters of A-Z a-z 0-9 _ -, got "a.b"`},
		{"streams equal", env("DEAD_STREAM", "DLF_STOP"), `DEAD_STREAM: must differ from STOP_STREAM (both "DLF_STOP")`},
		{"stream is the bucket's", env("OUTCOME_STREAM", "KV_dlf_stop_state"), `OUTCOME_STREAM: "KV_dlf_stop_state" is the stream of the state bucket`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := FromEnv(lookupMap(tt.env))
			if err == nil {
				t.Fatalf("FromEnv succeeded: %+v", c)
			}
			if !reflect.DeepEqual(c, Config{}) {
				t.Errorf("FromEnv returned a non-zero Config with an error")
			}
			if !hasLine(err, tt.want) {
				t.Fatalf("error does not have a line starting %q:\n%v", tt.want, err)
			}
		})
	}
}

// hasLine reports whether one line of err starts with want.
func hasLine(err error, want string) bool {
	for line := range strings.SplitSeq(err.Error(), "\n") {
		if strings.HasPrefix(line, want) {
			return true
		}
	}
	return false
}

func TestFromEnvReportsEveryProblem(t *testing.T) {
	_, err := FromEnv(lookupMap(env(
		"DLF_REGION", "<unset>",
		"DLF_TIMEOUT", "x",
		"WORKER_CONCURRENCY", "0",
		"STREAM_REPLICAS", "9",
		"LOG_FORMAT", "xml",
		"STOP_SUBJECT", "a.*",
		"HUAWEICLOUD_SDK_AK", "AK",
	)))
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"DLF_ENDPOINT:", "DLF_TIMEOUT:", "WORKER_CONCURRENCY:", "STREAM_REPLICAS:", "LOG_FORMAT:", "STOP_SUBJECT:", "HUAWEICLOUD_SDK_SK:"} {
		if !hasLine(err, want) {
			t.Errorf("missing %s in:\n%v", want, err)
		}
	}
	if n := len(strings.Split(err.Error(), "\n")); n != 7 {
		t.Errorf("got %d problems, want 7:\n%v", n, err)
	}
}

func TestFromEnvParseErrorHidesFollowOnErrors(t *testing.T) {
	// RETRY_MAX_INTERVAL does not parse and keeps its default (30s), which is
	// below RETRY_INITIAL_INTERVAL; only the parse error is reported.
	_, err := FromEnv(lookupMap(env("RETRY_INITIAL_INTERVAL", "1m", "RETRY_MAX_INTERVAL", "x")))
	if err == nil {
		t.Fatal("no error")
	}
	if got := err.Error(); got != `RETRY_MAX_INTERVAL: invalid duration "x" (want e.g. 500ms, 30s, 10m)` {
		t.Fatalf("error = %q", got)
	}
}

// Whatever the shape of a DLF_ENDPOINT, an error never shows what its user
// information, query or fragment hold (found by review, twice).
func TestEndpointErrorsShowNoSecret(t *testing.T) {
	for _, v := range []string{
		"https://u:SECRET@dlf.example.com/?a=b", "https://u:SE?CRET@dlf.example.com", "https://u:SE#CRET@dlf.example.com",
		"https://dlf.example.com/?t=SECRET", "https://dlf.example.com/#SECRET", "https://dlf.example.com/?p=x@SECRET",
		"https://dlf.example.com/#f@SECRET", "https://dlf.example.com/?t=SECRET,https://h@x", "https://u:SE?CRET@h/?t=x@SECRET",
		"http://SECRET@remote.example.com", "https://[::1#SECRET", "https://[::1?SECRET",
		"dlf.example.com/?SECRET", "://SECRET@x", "https://u:p@[::1]:99999/?SECRET",
	} {
		_, err := FromEnv(lookupMap(env("DLF_ENDPOINT", v)))
		if err == nil {
			t.Errorf("%q accepted", v)
			continue
		}
		if strings.Contains(err.Error(), "SECRET") || strings.Contains(err.Error(), "CRET") {
			t.Errorf("%q: the error shows a secret: %v", v, err)
		}
	}
}
