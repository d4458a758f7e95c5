package config

import (
	"errors"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// FromEnv returns Default overlaid with the environment, validated. lookup is
// os.LookupEnv in main and a map in tests. On error the Config is the zero
// value and the error lists every problem found.
func FromEnv(lookup func(string) (string, bool)) (Config, error) {
	c, errs := load(lookup)
	failed := map[string]bool{}
	for _, err := range errs {
		var ve *varError
		if errors.As(err, &ve) {
			failed[ve.name] = true
		}
	}
	// A value that did not parse kept its default; checking the default
	// against the other values would only add confusing errors.
	for _, err := range c.problems() {
		var ve *varError
		if errors.As(err, &ve) && failed[ve.name] {
			continue
		}
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return Config{}, err
	}
	return c, nil
}

// LoadNATS is Load for a command that only talks to NATS (worker stop): it
// reports only the NATS settings and the subject, stream, consumer and
// bucket names that could not be parsed, so a malformed variable that
// belongs to the worker alone (WORKER_CONCURRENCY=abc) does not stop it.
func LoadNATS(lookup func(string) (string, bool)) (Config, error) {
	c, errs := load(lookup)
	kept := errs[:0]
	for _, err := range errs {
		var ve *varError
		if errors.As(err, &ve) && !natsOrSubjects(ve.name) {
			continue
		}
		kept = append(kept, err)
	}
	return c, errors.Join(kept...)
}

func natsOrSubjects(name string) bool {
	for _, v := range vars {
		if v.name == name {
			return v.group == groupNATS || v.group == groupSubjects
		}
	}
	return false
}

// Load returns Default overlaid with the environment without validating it;
// the error lists values that could not be parsed (those keep their
// default). It also derives what the package documentation says is derived:
// a trailing slash is removed from DLF_ENDPOINT, which is set from DLF_REGION
// when unset; LOG_LEVEL and LOG_FORMAT are lower-cased; DLF_RATE_BURST
// becomes 1 when only DLF_RATE_LIMIT is set.
func Load(lookup func(string) (string, bool)) (Config, error) {
	c, errs := load(lookup)
	return c, errors.Join(errs...)
}

func load(lookup func(string) (string, bool)) (Config, []error) {
	c := Default()
	var errs []error
	for _, v := range vars {
		raw, ok := lookup(v.name)
		if !ok {
			continue
		}
		val := strings.TrimSpace(raw)
		if val == "" {
			continue
		}
		if err := v.set(&c, val); err != nil {
			errs = append(errs, err)
		}
	}
	c.DLF.Endpoint = strings.TrimRight(c.DLF.Endpoint, "/")
	if c.DLF.Endpoint == "" {
		c.DLF.Endpoint = c.DLF.EndpointURL()
	}
	c.LogLevel = strings.ToLower(c.LogLevel)
	c.LogFormat = strings.ToLower(c.LogFormat)
	if c.RateLimit > 0 && c.RateBurst == 0 {
		c.RateBurst = 1
	}
	return c, errs
}

// EnvNames returns every environment variable the worker reads, sorted.
func EnvNames() []string {
	names := make([]string, len(vars))
	for i, v := range vars {
		names[i] = v.name
	}
	sort.Strings(names)
	return names
}

type group int

const (
	groupOther group = iota
	groupNATS
	groupDLF
	groupSubjects // subject, stream, consumer and bucket names (not STREAM_REPLICAS)
)

// envVar ties one environment variable to its Config field.
type envVar struct {
	name   string
	group  group
	secret bool
	url    bool
	set    func(c *Config, val string) error
	get    func(c *Config) string
}

// show is the value as Redacted shows it.
func (v envVar) show(c *Config) string {
	val := v.get(c)
	switch {
	case val == "":
		return ""
	case v.secret:
		return redacted
	case v.url:
		return RedactURL(val)
	}
	return val
}

func str(name string, g group, field func(*Config) *string) envVar {
	return envVar{
		name:  name,
		group: g,
		set:   func(c *Config, val string) error { *field(c) = val; return nil },
		get:   func(c *Config) string { return *field(c) },
	}
}

func secret(name string, g group, field func(*Config) *string) envVar {
	v := str(name, g, field)
	v.secret = true
	return v
}

func urlVar(name string, g group, field func(*Config) *string) envVar {
	v := str(name, g, field)
	v.url = true
	return v
}

func duration(name string, g group, field func(*Config) *time.Duration) envVar {
	return envVar{
		name:  name,
		group: g,
		set: func(c *Config, val string) error {
			d, err := time.ParseDuration(val)
			if err != nil {
				return newVarError(name, "invalid duration %q (want e.g. 500ms, 30s, 10m)", val)
			}
			*field(c) = d
			return nil
		},
		get: func(c *Config) string { return field(c).String() },
	}
}

func integer(name string, field func(*Config) *int) envVar {
	return envVar{
		name: name,
		set: func(c *Config, val string) error {
			n, err := strconv.Atoi(val)
			if err != nil {
				return newVarError(name, "invalid integer %q", val)
			}
			*field(c) = n
			return nil
		},
		get: func(c *Config) string { return strconv.Itoa(*field(c)) },
	}
}

func number(name string, field func(*Config) *float64) envVar {
	return envVar{
		name: name,
		set: func(c *Config, val string) error {
			f, err := strconv.ParseFloat(val, 64)
			if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
				return newVarError(name, "invalid number %q", val)
			}
			*field(c) = f
			return nil
		},
		get: func(c *Config) string { return strconv.FormatFloat(*field(c), 'g', -1, 64) },
	}
}

// vars is the single list of environment variables: parsing, EnvNames and
// Redacted all come from it.
var vars = []envVar{
	urlVar("NATS_URL", groupNATS, func(c *Config) *string { return &c.NATS.URL }),
	str("NATS_USER", groupNATS, func(c *Config) *string { return &c.NATS.User }),
	secret("NATS_PASSWORD", groupNATS, func(c *Config) *string { return &c.NATS.Password }),
	str("NATS_PASSWORD_FILE", groupNATS, func(c *Config) *string { return &c.NATS.PasswordFile }),
	secret("NATS_TOKEN", groupNATS, func(c *Config) *string { return &c.NATS.Token }),
	str("NATS_CREDS", groupNATS, func(c *Config) *string { return &c.NATS.Creds }),
	str("NATS_NKEY", groupNATS, func(c *Config) *string { return &c.NATS.NKey }),
	str("NATS_CA", groupNATS, func(c *Config) *string { return &c.NATS.CA }),
	str("NATS_CERT", groupNATS, func(c *Config) *string { return &c.NATS.Cert }),
	str("NATS_KEY", groupNATS, func(c *Config) *string { return &c.NATS.Key }),

	str("STOP_SUBJECT", groupSubjects, func(c *Config) *string { return &c.Subjects.StopSubject }),
	str("STOP_STREAM", groupSubjects, func(c *Config) *string { return &c.Subjects.StopStream }),
	str("OUTCOME_SUBJECT_PREFIX", groupSubjects, func(c *Config) *string { return &c.Subjects.OutcomeSubjectPrefix }),
	str("OUTCOME_STREAM", groupSubjects, func(c *Config) *string { return &c.Subjects.OutcomeStream }),
	str("DEAD_SUBJECT", groupSubjects, func(c *Config) *string { return &c.Subjects.DeadSubject }),
	str("DEAD_STREAM", groupSubjects, func(c *Config) *string { return &c.Subjects.DeadStream }),
	str("CONSUMER_NAME", groupSubjects, func(c *Config) *string { return &c.Subjects.ConsumerName }),
	str("STATE_BUCKET", groupSubjects, func(c *Config) *string { return &c.Subjects.StateBucket }),
	integer("STREAM_REPLICAS", func(c *Config) *int { return &c.Subjects.StreamReplicas }),

	{
		name:  "DLF_ENDPOINT",
		group: groupDLF,
		url:   true,
		set:   func(c *Config, val string) error { c.DLF.Endpoint = val; return nil },
		get:   func(c *Config) string { return c.DLF.EndpointURL() },
	},
	str("DLF_REGION", groupDLF, func(c *Config) *string { return &c.DLF.Region }),
	secret("HUAWEICLOUD_SDK_AK", groupDLF, func(c *Config) *string { return &c.DLF.AK }),
	secret("HUAWEICLOUD_SDK_SK", groupDLF, func(c *Config) *string { return &c.DLF.SK }),
	str("HUAWEICLOUD_SDK_AK_FILE", groupDLF, func(c *Config) *string { return &c.DLF.AKFile }),
	str("HUAWEICLOUD_SDK_SK_FILE", groupDLF, func(c *Config) *string { return &c.DLF.SKFile }),
	secret("HUAWEICLOUD_SDK_SECURITY_TOKEN", groupDLF, func(c *Config) *string { return &c.DLF.SecurityToken }),
	secret("DLF_AUTH_TOKEN", groupDLF, func(c *Config) *string { return &c.DLF.AuthToken }),
	str("DLF_AUTH_TOKEN_FILE", groupDLF, func(c *Config) *string { return &c.DLF.AuthTokenFile }),
	str("HUAWEICLOUD_SDK_PROJECT_ID", groupDLF, func(c *Config) *string { return &c.DLF.ProjectID }),
	str("DLF_WORKSPACE", groupDLF, func(c *Config) *string { return &c.DLF.Workspace }),
	duration("DLF_TIMEOUT", groupDLF, func(c *Config) *time.Duration { return &c.DLF.Timeout }),

	duration("RETRY_INITIAL_INTERVAL", groupOther, func(c *Config) *time.Duration { return &c.Retry.InitialInterval }),
	duration("RETRY_MAX_INTERVAL", groupOther, func(c *Config) *time.Duration { return &c.Retry.MaxInterval }),
	duration("RETRY_MAX_ELAPSED", groupOther, func(c *Config) *time.Duration { return &c.Retry.MaxElapsed }),

	integer("WORKER_CONCURRENCY", func(c *Config) *int { return &c.WorkerConcurrency }),
	duration("SHUTDOWN_TIMEOUT", groupOther, func(c *Config) *time.Duration { return &c.ShutdownTimeout }),
	number("DLF_RATE_LIMIT", func(c *Config) *float64 { return &c.RateLimit }),
	integer("DLF_RATE_BURST", func(c *Config) *int { return &c.RateBurst }),
	duration("STATE_TTL", groupOther, func(c *Config) *time.Duration { return &c.StateTTL }),
	str("HTTP_ADDR", groupOther, func(c *Config) *string { return &c.HTTPAddr }),
	str("LOG_LEVEL", groupOther, func(c *Config) *string { return &c.LogLevel }),
	str("LOG_FORMAT", groupOther, func(c *Config) *string { return &c.LogFormat }),
}
