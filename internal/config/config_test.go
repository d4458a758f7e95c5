package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// contractVars is section 7 of the contract plus the names of section 2,
// copied by hand: EnvNames must match it exactly.
var contractVars = []string{
	// section 7
	"NATS_URL",
	"NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS", "NATS_NKEY", "NATS_CA", "NATS_CERT", "NATS_KEY",
	"DLF_ENDPOINT", "DLF_REGION",
	"HUAWEICLOUD_SDK_AK", "HUAWEICLOUD_SDK_SK",
	"HUAWEICLOUD_SDK_SECURITY_TOKEN",
	"DLF_AUTH_TOKEN",
	"HUAWEICLOUD_SDK_PROJECT_ID",
	"DLF_WORKSPACE",
	"DLF_TIMEOUT",
	"RETRY_INITIAL_INTERVAL", "RETRY_MAX_INTERVAL", "RETRY_MAX_ELAPSED",
	"WORKER_CONCURRENCY",
	"STREAM_REPLICAS",
	"SHUTDOWN_TIMEOUT",
	"DLF_RATE_LIMIT", "DLF_RATE_BURST",
	"HUAWEICLOUD_SDK_AK_FILE", "HUAWEICLOUD_SDK_SK_FILE", "DLF_AUTH_TOKEN_FILE", "NATS_PASSWORD_FILE",
	"STATE_TTL",
	"HTTP_ADDR",
	"LOG_LEVEL", "LOG_FORMAT",
	// section 2
	"STOP_SUBJECT", "STOP_STREAM",
	"OUTCOME_SUBJECT_PREFIX", "OUTCOME_STREAM",
	"DEAD_SUBJECT", "DEAD_STREAM",
	"CONSUMER_NAME",
	"STATE_BUCKET",
}

// Secret values used throughout; none may ever show up in an error or in
// Redacted output.
const (
	secretSK       = "SK-5ecret-Value-0001"
	secretSecToken = "SECTOKEN-5ecret-0002"
	secretAuthTok  = "AUTHTOKEN-5ecret-0003"
	secretNATSPass = "NATSPASS-5ecret-0004"
	secretNATSTok  = "NATSTOKEN-5ecret-0005"
	secretURLPass  = "URLPASS-5ecret-0006"
)

var allSecrets = []string{secretSK, secretSecToken, secretAuthTok, secretNATSPass, secretNATSTok, secretURLPass}

func lookupMap(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

// env returns a minimal valid environment plus kv (pairs of name, value).
// A value of "<unset>" removes the variable.
func env(kv ...string) map[string]string {
	m := map[string]string{"DLF_REGION": "cn-north-4"}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "<unset>" {
			delete(m, kv[i])
			continue
		}
		m[kv[i]] = kv[i+1]
	}
	return m
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefault(t *testing.T) {
	c := Default()
	want := Config{
		NATS: NATS{URL: "nats://127.0.0.1:4222"},
		Subjects: Subjects{
			StopSubject:          "dlf.stop.request",
			StopStream:           "DLF_STOP",
			OutcomeSubjectPrefix: "dlf.stop.outcome",
			OutcomeStream:        "DLF_STOP_OUTCOMES",
			DeadSubject:          "dlf.stop.dead",
			DeadStream:           "DLF_STOP_DEAD",
			ConsumerName:         "dlf-stop-worker",
			StateBucket:          "dlf_stop_state",
			StreamReplicas:       1,
		},
		DLF: DLF{Timeout: 10 * time.Second},
		Retry: Retry{
			InitialInterval: 500 * time.Millisecond,
			MaxInterval:     30 * time.Second,
			MaxElapsed:      10 * time.Minute,
		},
		WorkerConcurrency: 32,
		ShutdownTimeout:   20 * time.Second,
		RateLimit:         0,
		RateBurst:         0,
		StateTTL:          24 * time.Hour,
		HTTPAddr:          ":8080",
		LogLevel:          "info",
		LogFormat:         "json",
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Default() =\n%+v\nwant\n%+v", c, want)
	}
	// Default lacks only a DLF endpoint.
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "DLF_ENDPOINT: not set") {
		t.Fatalf("Default().Validate() = %v, want only the missing endpoint", err)
	}
	if got := strings.Count(err.Error(), "\n"); got != 0 {
		t.Fatalf("Default().Validate() reported more than one problem:\n%v", err)
	}
}

func TestFromEnvMinimal(t *testing.T) {
	c, err := FromEnv(lookupMap(env()))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.DLF.Region = "cn-north-4"
	want.DLF.Endpoint = "https://dayu-dlf.cn-north-4.myhuaweicloud.com"
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("FromEnv =\n%+v\nwant\n%+v", c, want)
	}
	if !c.DLF.Unauthenticated() {
		t.Error("Unauthenticated() = false with no credentials")
	}
}

func TestFromEnvParsesEachVariable(t *testing.T) {
	file := writeFile(t, "f", "content\n")
	tests := []struct {
		name  string
		value string
		extra []string // more variables needed for a valid configuration
		check func(Config) any
		want  any
	}{
		{"NATS_URL", "nats://a:4222, tls://b:4443", nil, func(c Config) any { return c.NATS.URL }, "nats://a:4222, tls://b:4443"},
		{"NATS_USER", "alice", []string{"NATS_PASSWORD", "pw"}, func(c Config) any { return c.NATS.User }, "alice"},
		{"NATS_PASSWORD", "pw", []string{"NATS_USER", "alice"}, func(c Config) any { return c.NATS.Password }, "pw"},
		{"NATS_PASSWORD_FILE", file, []string{"NATS_USER", "alice"}, func(c Config) any { return c.NATS.PasswordFile }, file},
		{"NATS_TOKEN", "tok", nil, func(c Config) any { return c.NATS.Token }, "tok"},
		{"NATS_CREDS", file, nil, func(c Config) any { return c.NATS.Creds }, file},
		{"NATS_NKEY", file, nil, func(c Config) any { return c.NATS.NKey }, file},
		{"NATS_CA", file, nil, func(c Config) any { return c.NATS.CA }, file},
		{"NATS_CERT", file, []string{"NATS_KEY", file}, func(c Config) any { return c.NATS.Cert }, file},
		{"NATS_KEY", file, []string{"NATS_CERT", file}, func(c Config) any { return c.NATS.Key }, file},

		{"STOP_SUBJECT", "a.b", nil, func(c Config) any { return c.Subjects.StopSubject }, "a.b"},
		{"STOP_STREAM", "S1", nil, func(c Config) any { return c.Subjects.StopStream }, "S1"},
		{"OUTCOME_SUBJECT_PREFIX", "x.out", nil, func(c Config) any { return c.Subjects.OutcomeSubjectPrefix }, "x.out"},
		{"OUTCOME_STREAM", "S2", nil, func(c Config) any { return c.Subjects.OutcomeStream }, "S2"},
		{"DEAD_SUBJECT", "x.dead", nil, func(c Config) any { return c.Subjects.DeadSubject }, "x.dead"},
		{"DEAD_STREAM", "S3", nil, func(c Config) any { return c.Subjects.DeadStream }, "S3"},
		{"CONSUMER_NAME", "c-1", nil, func(c Config) any { return c.Subjects.ConsumerName }, "c-1"},
		{"STATE_BUCKET", "b_1", nil, func(c Config) any { return c.Subjects.StateBucket }, "b_1"},
		{"STREAM_REPLICAS", "3", nil, func(c Config) any { return c.Subjects.StreamReplicas }, 3},

		{"DLF_ENDPOINT", "https://dlf.example.com/base/", nil, func(c Config) any { return c.DLF.Endpoint }, "https://dlf.example.com/base"},
		{"DLF_REGION", "ap-southeast-1", nil, func(c Config) any { return c.DLF.EndpointURL() }, "https://dayu-dlf.ap-southeast-1.myhuaweicloud.com"},
		{"HUAWEICLOUD_SDK_AK", "AKAK", []string{"HUAWEICLOUD_SDK_SK", "sk"}, func(c Config) any { return c.DLF.AK }, "AKAK"},
		{"HUAWEICLOUD_SDK_SK", "sk", []string{"HUAWEICLOUD_SDK_AK", "AKAK"}, func(c Config) any { return c.DLF.SK }, "sk"},
		{"HUAWEICLOUD_SDK_AK_FILE", file, []string{"HUAWEICLOUD_SDK_SK", "sk"}, func(c Config) any { return c.DLF.AKFile }, file},
		{"HUAWEICLOUD_SDK_SK_FILE", file, []string{"HUAWEICLOUD_SDK_AK", "AKAK"}, func(c Config) any { return c.DLF.SKFile }, file},
		{"HUAWEICLOUD_SDK_SECURITY_TOKEN", "st", []string{"HUAWEICLOUD_SDK_AK", "AKAK", "HUAWEICLOUD_SDK_SK", "sk"}, func(c Config) any { return c.DLF.SecurityToken }, "st"},
		{"DLF_AUTH_TOKEN", "tok", nil, func(c Config) any { return c.DLF.AuthToken }, "tok"},
		{"DLF_AUTH_TOKEN_FILE", file, nil, func(c Config) any { return c.DLF.AuthTokenFile }, file},
		{"HUAWEICLOUD_SDK_PROJECT_ID", "0123abc", nil, func(c Config) any { return c.DLF.ProjectID }, "0123abc"},
		{"DLF_WORKSPACE", "ws-1", nil, func(c Config) any { return c.DLF.Workspace }, "ws-1"},
		{"DLF_TIMEOUT", "3s", nil, func(c Config) any { return c.DLF.Timeout }, 3 * time.Second},

		{"RETRY_INITIAL_INTERVAL", "1s", nil, func(c Config) any { return c.Retry.InitialInterval }, time.Second},
		{"RETRY_MAX_INTERVAL", "1m", nil, func(c Config) any { return c.Retry.MaxInterval }, time.Minute},
		{"RETRY_MAX_ELAPSED", "1h", nil, func(c Config) any { return c.Retry.MaxElapsed }, time.Hour},
		{"WORKER_CONCURRENCY", "4096", nil, func(c Config) any { return c.WorkerConcurrency }, 4096},
		{"SHUTDOWN_TIMEOUT", "45s", nil, func(c Config) any { return c.ShutdownTimeout }, 45 * time.Second},
		{"DLF_RATE_LIMIT", "2.5", []string{"DLF_RATE_BURST", "5"}, func(c Config) any { return c.RateLimit }, 2.5},
		{"DLF_RATE_BURST", "5", nil, func(c Config) any { return c.RateBurst }, 5},
		{"STATE_TTL", "48h", nil, func(c Config) any { return c.StateTTL }, 48 * time.Hour},
		{"HTTP_ADDR", "127.0.0.1:9090", nil, func(c Config) any { return c.HTTPAddr }, "127.0.0.1:9090"},
		{"LOG_LEVEL", "DEBUG", nil, func(c Config) any { return c.LogLevel }, "debug"},
		{"LOG_FORMAT", "console", nil, func(c Config) any { return c.LogFormat }, "console"},
	}
	seen := map[string]bool{}
	for _, tt := range tests {
		seen[tt.name] = true
		t.Run(tt.name, func(t *testing.T) {
			m := env(append([]string{tt.name, "  " + tt.value + "\n"}, tt.extra...)...)
			c, err := FromEnv(lookupMap(m))
			if err != nil {
				t.Fatalf("FromEnv: %v", err)
			}
			if got := tt.check(c); got != tt.want {
				t.Fatalf("%s=%q: got %v, want %v", tt.name, tt.value, got, tt.want)
			}
		})
	}
	for _, name := range EnvNames() {
		if !seen[name] {
			t.Errorf("no parse test for %s", name)
		}
	}
}

func TestFromEnvEmptyValueMeansDefault(t *testing.T) {
	m := env()
	for _, name := range EnvNames() {
		if name != "DLF_REGION" {
			m[name] = " \t"
		}
	}
	c, err := FromEnv(lookupMap(m))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.DLF.Region = "cn-north-4"
	want.DLF.Endpoint = want.DLF.EndpointURL()
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got\n%+v\nwant\n%+v", c, want)
	}
}

func TestFromEnvDerived(t *testing.T) {
	t.Run("endpoint wins over region", func(t *testing.T) {
		c, err := FromEnv(lookupMap(env("DLF_ENDPOINT", "https://example.com")))
		if err != nil {
			t.Fatal(err)
		}
		if c.DLF.Endpoint != "https://example.com" || c.DLF.EndpointURL() != "https://example.com" {
			t.Fatalf("endpoint = %q", c.DLF.Endpoint)
		}
	})
	t.Run("rate burst defaults to 1 with a rate", func(t *testing.T) {
		c, err := FromEnv(lookupMap(env("DLF_RATE_LIMIT", "10")))
		if err != nil {
			t.Fatal(err)
		}
		if c.RateBurst != 1 {
			t.Fatalf("RateBurst = %d, want 1", c.RateBurst)
		}
	})
	t.Run("loopback http", func(t *testing.T) {
		for _, ep := range []string{"http://127.0.0.1:8080", "http://127.9.9.9", "http://[::1]:1", "http://localhost:80", "http://LOCALHOST"} {
			if _, err := FromEnv(lookupMap(env("DLF_REGION", "<unset>", "DLF_ENDPOINT", ep))); err != nil {
				t.Errorf("%s: %v", ep, err)
			}
		}
	})
	t.Run("no credentials is allowed", func(t *testing.T) {
		c, err := FromEnv(lookupMap(env("DLF_ENDPOINT", "https://dlf.example.com")))
		if err != nil {
			t.Fatal(err)
		}
		if !c.DLF.Unauthenticated() {
			t.Fatal("Unauthenticated() = false")
		}
	})
	t.Run("token is authenticated", func(t *testing.T) {
		c, err := FromEnv(lookupMap(env("DLF_AUTH_TOKEN", "t")))
		if err != nil {
			t.Fatal(err)
		}
		if c.DLF.Unauthenticated() {
			t.Fatal("Unauthenticated() = true")
		}
	})
}

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
		{"endpoint not a URL", env("DLF_ENDPOINT", "https://[::1"), `DLF_ENDPOINT: "https://[::1" is not a valid URL`},
		{"endpoint scheme", env("DLF_ENDPOINT", "ftp://dlf.example.com"), "DLF_ENDPOINT: scheme must be https"},
		{"endpoint http remote", env("DLF_ENDPOINT", "http://dlf.example.com"), "DLF_ENDPOINT: plain http is allowed only for loopback hosts"},
		{"endpoint http private ip", env("DLF_ENDPOINT", "http://10.0.0.1:8080"), "DLF_ENDPOINT: plain http is allowed only for loopback hosts"},
		{"endpoint http localhost lookalike", env("DLF_ENDPOINT", "http://localhost.example.com"), "DLF_ENDPOINT: plain http is allowed only for loopback hosts"},
		{"endpoint query", env("DLF_ENDPOINT", "https://dlf.example.com/?a=b"), "DLF_ENDPOINT: must not have a query or fragment"},
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
		{"sk file missing", env("HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK_FILE", missing), fmt.Sprintf("HUAWEICLOUD_SDK_SK_FILE: cannot open %q: no such file or directory", missing)},
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
		{"nats user without password", env("NATS_USER", "u"), "NATS_PASSWORD: required when NATS_USER is set"},
		{"nats password without user", env("NATS_PASSWORD", "p"), "NATS_USER: required when NATS_PASSWORD or NATS_PASSWORD_FILE is set"},
		{"nats password and file", env("NATS_USER", "u", "NATS_PASSWORD", "p", "NATS_PASSWORD_FILE", file), "NATS_PASSWORD: cannot be combined with NATS_PASSWORD_FILE"},
		{"nats password file missing", env("NATS_USER", "u", "NATS_PASSWORD_FILE", missing), fmt.Sprintf("NATS_PASSWORD_FILE: cannot open %q", missing)},
		{"nats cert without key", env("NATS_CERT", file), "NATS_KEY: required when NATS_CERT is set"},
		{"nats key without cert", env("NATS_KEY", file), "NATS_CERT: required when NATS_KEY is set"},
		{"nats ca missing", env("NATS_CA", missing), fmt.Sprintf("NATS_CA: cannot open %q", missing)},
		{"nats creds missing", env("NATS_CREDS", missing), fmt.Sprintf("NATS_CREDS: cannot open %q", missing)},
		{"nats nkey empty", env("NATS_NKEY", empty), fmt.Sprintf("NATS_NKEY: %q is empty", empty)},
		{"nats cert missing", env("NATS_CERT", missing, "NATS_KEY", file), fmt.Sprintf("NATS_CERT: cannot open %q", missing)},
		{"nats key missing", env("NATS_CERT", file, "NATS_KEY", missing), fmt.Sprintf("NATS_KEY: cannot open %q", missing)},

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

// secretEnvs are environments holding every secret, valid and invalid.
func secretEnvs(t *testing.T) map[string]map[string]string {
	file := writeFile(t, "f", "x")
	return map[string]map[string]string{
		"valid aksk": env(
			"HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK", secretSK, "HUAWEICLOUD_SDK_SECURITY_TOKEN", secretSecToken,
			"NATS_USER", "u", "NATS_PASSWORD", secretNATSPass,
			"NATS_URL", "nats://u:"+secretURLPass+"@127.0.0.1:4222,nats://"+secretURLPass+"@h:1"),
		"aksk and token": env(
			"HUAWEICLOUD_SDK_AK", "AK", "HUAWEICLOUD_SDK_SK", secretSK, "HUAWEICLOUD_SDK_SECURITY_TOKEN", secretSecToken,
			"DLF_AUTH_TOKEN", secretAuthTok, "NATS_TOKEN", secretNATSTok, "NATS_PASSWORD", secretNATSPass),
		"sk and file, token and file": env(
			"HUAWEICLOUD_SDK_SK", secretSK, "HUAWEICLOUD_SDK_SK_FILE", file,
			"DLF_AUTH_TOKEN", secretAuthTok, "DLF_AUTH_TOKEN_FILE", file,
			"NATS_PASSWORD", secretNATSPass, "NATS_PASSWORD_FILE", file, "NATS_TOKEN", secretNATSTok),
		"security token alone": env("HUAWEICLOUD_SDK_SECURITY_TOKEN", secretSecToken, "NATS_TOKEN", secretNATSTok, "NATS_CREDS", file),
		"bad urls": env(
			"NATS_URL", "http://u:"+secretURLPass+"@h:1,nats://u:"+secretURLPass+"@h:port,"+secretURLPass+"@:1",
			"DLF_ENDPOINT", "http://u:"+secretURLPass+"@example.com/?q", "DLF_AUTH_TOKEN", secretAuthTok),
		"bad endpoint url": env("DLF_ENDPOINT", "https://u:"+secretURLPass+"@[::1", "DLF_AUTH_TOKEN", secretAuthTok),
	}
}

func TestSecretsNeverLeak(t *testing.T) {
	for name, m := range secretEnvs(t) {
		t.Run(name, func(t *testing.T) {
			check := func(where, s string) {
				t.Helper()
				for _, secret := range allSecrets {
					if strings.Contains(s, secret) {
						t.Errorf("%s contains secret %q:\n%s", where, secret, s)
					}
				}
			}
			if _, err := FromEnv(lookupMap(m)); err != nil {
				check("FromEnv error", err.Error())
			}
			c, err := Load(lookupMap(m))
			if err != nil {
				check("Load error", err.Error())
			}
			if err := c.Validate(); err != nil {
				check("Validate error", err.Error())
			}
			for _, err := range []error{c.NATS.Validate(), c.DLF.Validate(), c.Subjects.Validate()} {
				if err != nil {
					check("part Validate error", err.Error())
				}
			}
			check("Redacted", fmt.Sprint(c.Redacted()))
			check("%v", fmt.Sprintf("%v", c))
			check("%+v", fmt.Sprintf("%+v", c))
			check("%#v", fmt.Sprintf("%#v", c))
			check("NATS %v", fmt.Sprintf("%v", c.NATS))
			check("DLF %#v", fmt.Sprintf("%#v", c.DLF))
			b, err := json.Marshal(c)
			if err != nil {
				t.Fatal(err)
			}
			check("json", string(b))
		})
	}
}

func TestRedacted(t *testing.T) {
	c, err := FromEnv(lookupMap(secretEnvs(t)["valid aksk"]))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Redacted()
	if got, want := slices.Sorted(maps.Keys(r)), EnvNames(); !slices.Equal(got, want) {
		t.Fatalf("Redacted keys = %v, want %v", got, want)
	}
	want := map[string]string{
		"HUAWEICLOUD_SDK_SK":             "[redacted]",
		"HUAWEICLOUD_SDK_SECURITY_TOKEN": "[redacted]",
		"NATS_PASSWORD":                  "[redacted]",
		"NATS_TOKEN":                     "",
		"DLF_AUTH_TOKEN":                 "",
		"HUAWEICLOUD_SDK_AK":             "AK",
		"NATS_USER":                      "u",
		"NATS_URL":                       "nats://[redacted]@127.0.0.1:4222,nats://[redacted]@h:1",
		"DLF_ENDPOINT":                   "https://dayu-dlf.cn-north-4.myhuaweicloud.com",
		"DLF_TIMEOUT":                    "10s",
		"WORKER_CONCURRENCY":             "32",
		"DLF_RATE_LIMIT":                 "0",
		"STOP_SUBJECT":                   "dlf.stop.request",
	}
	for k, v := range want {
		if r[k] != v {
			t.Errorf("Redacted()[%s] = %q, want %q", k, r[k], v)
		}
	}
	if s := c.DLF.String(); !strings.Contains(s, `HUAWEICLOUD_SDK_SK:"[redacted]"`) || !strings.Contains(s, `HUAWEICLOUD_SDK_AK:"AK"`) {
		t.Errorf("DLF.String() = %s", s)
	}
}

func TestRedactURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"nats://127.0.0.1:4222", "nats://127.0.0.1:4222"},
		{"nats://u:p@h:4222", "nats://[redacted]@h:4222"},
		{"nats://token@h:4222", "nats://[redacted]@h:4222"},
		{"u:p@h:4222", "[redacted]@h:4222"},
		{"nats://u:p@a@h:4222/x@y", "nats://[redacted]@h:4222/x@y"},
		{"nats://a:1, nats://u:p@b:2", "nats://a:1, nats://[redacted]@b:2"},
		{"https://h/path?q=a@b", "https://h/path?q=a@b"},
		{"https://u:p@[::1", "https://[redacted]@[::1"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := RedactURL(tt.in); got != tt.want {
			t.Errorf("RedactURL(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestEnvNamesCoversContract(t *testing.T) {
	got := EnvNames()
	if !slices.IsSorted(got) {
		t.Errorf("EnvNames() is not sorted: %v", got)
	}
	want := slices.Clone(contractVars)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		for _, n := range want {
			if !slices.Contains(got, n) {
				t.Errorf("EnvNames() misses %s", n)
			}
		}
		for _, n := range got {
			if !slices.Contains(want, n) {
				t.Errorf("EnvNames() has %s, not in the contract", n)
			}
		}
	}
	if len(slices.Compact(slices.Clone(got))) != len(got) {
		t.Errorf("EnvNames() has duplicates: %v", got)
	}
}

func TestFromEnvReadsOnlyEnvNames(t *testing.T) {
	var asked []string
	_, _ = FromEnv(func(k string) (string, bool) {
		asked = append(asked, k)
		return "", false
	})
	slices.Sort(asked)
	if !slices.Equal(asked, EnvNames()) {
		t.Fatalf("FromEnv looked up %v, want %v", asked, EnvNames())
	}
}

func TestPartValidate(t *testing.T) {
	// `worker stop` validates only NATS and Subjects: no DLF needed.
	c, err := Load(lookupMap(map[string]string{"NATS_URL": "nats://h:1"}))
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(c.NATS.Validate(), c.Subjects.Validate()); err != nil {
		t.Fatal(err)
	}
	if err := c.DLF.Validate(); err == nil {
		t.Fatal("DLF.Validate() without endpoint succeeded")
	}
	c.DLF.Region = "eu-west-101"
	if err := c.DLF.Validate(); err != nil {
		t.Fatalf("DLF.Validate() with region: %v", err)
	}
	if got := c.DLF.EndpointURL(); got != "https://dayu-dlf.eu-west-101.myhuaweicloud.com" {
		t.Fatalf("EndpointURL() = %q", got)
	}
}
