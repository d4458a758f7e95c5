package config

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
)

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
