package deploy

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nats-server/v2/server"
)

// natsConfPath is the NATS server configuration.
const natsConfPath = "nats/nats-server.conf"

// The users nats-server.conf must define in the application account.
var natsUsers = []string{"dlf-worker", "scheduler", "auditor", "dlf-admin"}

func readNATSConf(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(natsConfPath)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// stripConfComments removes # and // comments outside quoted strings, the
// two comment styles of the NATS configuration format ("//" only after
// white space, so nats-route://host stays).
func stripConfComments(s string) string {
	lines := strings.Split(s, "\n")
	for i, line := range lines {
		lines[i] = stripLineComment(line)
	}
	return strings.Join(lines, "\n")
}

func stripLineComment(line string) string {
	var quote rune
	for i, r := range line {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			}
		case r == '"' || r == '\'':
			quote = r
		case r == '#':
			return line[:i]
		case strings.HasPrefix(line[i:], "//") && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t'):
			return line[:i]
		}
	}
	return line
}

var (
	// A credential field and its value, up to the next separator.
	confSecretRe = regexp.MustCompile(`(?i)\b(password|pass|token|auth_token)\s*[:=]\s*([^\s,}\]]+)`)
	// An unquoted variable reference: the value comes from the environment
	// unless the file defines the variable.
	confVarRe = regexp.MustCompile(`^\$([A-Za-z_][A-Za-z0-9_]*)$`)
)

// confVarDefined reports whether the configuration assigns name itself.
func confVarDefined(conf, name string) bool {
	return regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(name) + `\s*[:=]`).MatchString(conf)
}

// natsConfProblems checks the text: the three users exist, and every
// password or token is a reference to an environment variable, never a
// literal (a quoted "$X" is a literal too, and so is a bcrypt hash).
func natsConfProblems(raw string) []string {
	conf := stripConfComments(raw)
	var out []string
	for _, u := range natsUsers {
		re := regexp.MustCompile(`\buser\s*[:=]\s*["']?` + regexp.QuoteMeta(u) + `["']?[\s,}]`)
		if !re.MatchString(conf) {
			out = append(out, fmt.Sprintf("%s: no user %s", natsConfPath, u))
		}
	}
	secrets := confSecretRe.FindAllStringSubmatch(conf, -1)
	if len(secrets) == 0 {
		out = append(out, fmt.Sprintf("%s: no password at all; every user needs one", natsConfPath))
	}
	for _, m := range secrets {
		v := confVarRe.FindStringSubmatch(m[2])
		switch {
		case v == nil:
			out = append(out, fmt.Sprintf("%s: %s %s is a literal; use an environment variable ($NAME)", natsConfPath, m[1], m[2]))
		case confVarDefined(conf, v[1]):
			out = append(out, fmt.Sprintf("%s: %s $%s is defined in the file, so it is a literal", natsConfPath, m[1], v[1]))
		}
	}
	return out
}

// confEnvRefs returns the variables the configuration takes from the
// environment.
func confEnvRefs(raw string) []string {
	conf := stripConfComments(raw)
	seen := map[string]bool{}
	for _, m := range regexp.MustCompile(`[:=]\s*\$([A-Za-z_][A-Za-z0-9_]*)`).FindAllStringSubmatch(conf, -1) {
		if !confVarDefined(conf, m[1]) {
			seen[m[1]] = true
		}
	}
	return sortedKeys(seen)
}

// envSentinel is the value loadNATSConf gives variable name.
func envSentinel(name string) string { return "sentinel-" + strings.ToLower(name) }

// loadNATSConf parses the configuration with nats-server itself, every
// referenced variable set to its sentinel.
func loadNATSConf(t *testing.T) *server.Options {
	t.Helper()
	for _, name := range confEnvRefs(readNATSConf(t)) {
		t.Setenv(name, envSentinel(name))
	}
	opts, err := server.ProcessConfigFile(natsConfPath)
	if err != nil {
		t.Fatalf("nats-server rejects %s: %v", natsConfPath, err)
	}
	return opts
}

func TestNATSConfHasUsersAndNoLiteralSecrets(t *testing.T) {
	reportProblems(t, natsConfProblems(readNATSConf(t)))
}

func TestNATSConfChecksCatchBadConfigs(t *testing.T) {
	conf := readNATSConf(t)
	if p := natsConfProblems(conf); len(p) > 0 {
		t.Fatalf("configuration as shipped has problems: %v", p)
	}
	cases := []struct{ name, old, new, want string }{
		{"literal password", "password: $DLF_WORKER_PASSWORD", "password: s3cret", "password s3cret is a literal"},
		{"quoted variable", "password: $DLF_SCHEDULER_PASSWORD", `password: "$DLF_SCHEDULER_PASSWORD"`, `"$DLF_SCHEDULER_PASSWORD" is a literal`},
		{"bcrypt hash inline", "password: $DLF_AUDITOR_PASSWORD", "password: $2a$11$abcdefghijklmnopqrstuv", "is a literal"},
		{"variable defined in the file", "system_account: SYS", "DLF_WORKER_PASSWORD: hunter2\nsystem_account: SYS", "$DLF_WORKER_PASSWORD is defined in the file"},
		{"worker user renamed", "user: dlf-worker", "user: worker", "no user dlf-worker"},
		{"worker user commented out", "user: dlf-worker", "# user: dlf-worker", "no user dlf-worker"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(conf, tc.old) {
				t.Fatalf("configuration has no %q to change", tc.old)
			}
			problems := natsConfProblems(strings.Replace(conf, tc.old, tc.new, 1))
			for _, p := range problems {
				if strings.Contains(p, tc.want) {
					return
				}
			}
			t.Errorf("no problem mentions %q; got %q", tc.want, problems)
		})
	}
}

// TestNATSConfLoads parses the configuration with nats-server and checks
// what it makes of it: a named 3-node JetStream cluster, the users in the
// application account, each with the password from its variable.
func TestNATSConfLoads(t *testing.T) {
	opts := loadNATSConf(t)
	if !opts.JetStream || opts.StoreDir == "" {
		t.Errorf("JetStream %v with store dir %q; want it on with a store dir", opts.JetStream, opts.StoreDir)
	}
	if opts.Cluster.Name == "" || len(opts.Routes) != 3 {
		t.Errorf("cluster %q with %d routes; want a named cluster of 3", opts.Cluster.Name, len(opts.Routes))
	}
	if opts.ServerName != envSentinel("SERVER_NAME") {
		t.Errorf("server_name %q; want it from $SERVER_NAME", opts.ServerName)
	}
	users := map[string]*server.User{}
	for _, u := range opts.Users {
		users[u.Username] = u
		if !strings.HasPrefix(u.Password, "sentinel-") {
			t.Errorf("user %s: password is not taken from the environment", u.Username)
		}
	}
	var account string
	for _, name := range natsUsers {
		u := users[name]
		if u == nil {
			t.Errorf("nats-server sees no user %s", name)
			continue
		}
		if u.Account == nil || u.Account.Name == opts.SystemAccount {
			t.Errorf("user %s is not in an application account", name)
			continue
		}
		if account == "" {
			account = u.Account.Name
		} else if u.Account.Name != account {
			t.Errorf("user %s is in account %s, the others in %s; they share the streams, so one account", name, u.Account.Name, account)
		}
		if u.Permissions == nil || u.Permissions.Publish == nil || len(u.Permissions.Publish.Allow) == 0 {
			t.Errorf("user %s has no publish allow-list", name)
		}
	}
	if u := users["dlf-worker"]; u != nil && u.Password != envSentinel("DLF_WORKER_PASSWORD") {
		t.Errorf("dlf-worker's password is not $DLF_WORKER_PASSWORD")
	}
}

// The file and the README tell operators which plain passwords the server
// reads as given: a letter first, then letters, digits and "+/=", and not
// a word the parser takes for a boolean. Others are read as numbers,
// sizes or booleans, and the server refuses to start or sees another
// password (found by review: "10MB", "true" and "no" followed the rule as
// written before).
func TestNATSConfPasswordShapes(t *testing.T) {
	for _, tc := range []struct {
		pw   string
		read bool
	}{
		{"abcDEF123", true}, {"Yesterday", true}, {"off1", true}, {"k10MB", true},
		{"a+/=b9", true}, {"Z9", true}, {"nope", true},
		{"10MB", false}, {"12345", false}, {"true", false}, {"no", false}, {"Yes", false}, {"OFF", false},
	} {
		t.Run(tc.pw, func(t *testing.T) {
			for _, name := range confEnvRefs(readNATSConf(t)) {
				t.Setenv(name, envSentinel(name))
			}
			t.Setenv("DLF_WORKER_PASSWORD", tc.pw)
			opts, err := server.ProcessConfigFile(natsConfPath)
			got := ""
			if err == nil {
				for _, u := range opts.Users {
					if u.Username == "dlf-worker" {
						got = u.Password
					}
				}
			}
			if follows := passwordFollowsTheRule(tc.pw); follows != tc.read {
				t.Fatalf("the documented rule says %v for %q, the case says %v", follows, tc.pw, tc.read)
			}
			if ok := err == nil && got == tc.pw; ok != tc.read {
				t.Errorf("password %q read as given: %v, want %v (err %v)", tc.pw, ok, tc.read, err)
			}
		})
	}
}

// passwordFollowsTheRule is the rule nats-server.conf states for plain
// passwords.
func passwordFollowsTheRule(pw string) bool {
	if pw == "" || !unicode.IsLetter(rune(pw[0])) {
		return false
	}
	switch strings.ToLower(pw) {
	case "true", "false", "yes", "no", "on", "off":
		return false
	}
	return strings.IndexFunc(pw, func(r rune) bool {
		return !(r < utf8.RuneSelf && (unicode.IsLetter(r) || unicode.IsDigit(r) || strings.ContainsRune("+/=", r)))
	}) < 0
}
