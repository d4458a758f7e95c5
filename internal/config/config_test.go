package config

import (
	"errors"
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
	t.Run("path prefix", func(t *testing.T) {
		for _, ep := range []string{"https://gw.example.com/dlf", "https://gw.example.com/a_b-c~d.e/v1/", "https://gw.example.com/"} {
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
