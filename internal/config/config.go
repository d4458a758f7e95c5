package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Config is the whole configuration of the worker. The zero value is not
// usable; start from Default or FromEnv.
type Config struct {
	NATS     NATS
	Subjects Subjects
	DLF      DLF
	Retry    Retry

	// WorkerConcurrency is the number of DLF calls in flight in one worker
	// (WORKER_CONCURRENCY, 1..4096).
	WorkerConcurrency int
	// ShutdownTimeout is the time, on SIGTERM, to finish or return in-flight
	// commands (SHUTDOWN_TIMEOUT).
	ShutdownTimeout time.Duration
	// RateLimit is DLF requests per second per worker; 0 is off
	// (DLF_RATE_LIMIT).
	RateLimit float64
	// RateBurst is the rate limiter's burst (DLF_RATE_BURST); at least 1
	// when RateLimit is set.
	RateBurst int
	// StateTTL is how long the state bucket remembers a command and a
	// stopped instance (STATE_TTL); not shorter than Retry.MaxElapsed.
	StateTTL time.Duration
	// HTTPAddr serves /metrics, /healthz and /readyz (HTTP_ADDR).
	HTTPAddr string
	// LogLevel is a zap level name (LOG_LEVEL).
	LogLevel string
	// LogFormat is "json" or "console" (LOG_FORMAT).
	LogFormat string
}

// NATS is how to reach and authenticate to NATS. Its String and MarshalJSON
// methods redact the secrets.
type NATS struct {
	// URL is one or more server URLs, comma separated (NATS_URL).
	URL string
	// User and Password authenticate with a user name and password
	// (NATS_USER, NATS_PASSWORD).
	User     string
	Password string
	// PasswordFile is read instead of Password, at every connect and
	// reconnect (NATS_PASSWORD_FILE).
	PasswordFile string
	// Token is an authentication token (NATS_TOKEN).
	Token string
	// Creds is the path of a .creds file: user JWT and seed (NATS_CREDS).
	Creds string
	// NKey is the path of a file holding a user nkey seed (NATS_NKEY).
	NKey string
	// CA is the path of a PEM file of CAs to trust (NATS_CA).
	CA string
	// Cert and Key are the paths of the client certificate and its key for
	// mutual TLS (NATS_CERT, NATS_KEY).
	Cert string
	Key  string
}

// Subjects names the subjects, streams, consumer and bucket of section 2 of
// the contract.
type Subjects struct {
	StopSubject          string // STOP_SUBJECT
	StopStream           string // STOP_STREAM
	OutcomeSubjectPrefix string // OUTCOME_SUBJECT_PREFIX; outcomes go to <prefix>.<status>
	OutcomeStream        string // OUTCOME_STREAM
	DeadSubject          string // DEAD_SUBJECT
	DeadStream           string // DEAD_STREAM
	ConsumerName         string // CONSUMER_NAME; also the durable name
	StateBucket          string // STATE_BUCKET
	StreamReplicas       int    // STREAM_REPLICAS, 1..5, for streams the worker creates
}

// DLF is how to reach and authenticate to the DLF API. Its String and
// MarshalJSON methods redact the secrets.
type DLF struct {
	// Endpoint is the base URL of the DLF API (DLF_ENDPOINT). When empty,
	// EndpointURL derives it from Region.
	Endpoint string
	// Region, e.g. cn-north-4 (DLF_REGION).
	Region string
	// AK and SK sign requests (HUAWEICLOUD_SDK_AK, HUAWEICLOUD_SDK_SK); AKFile
	// and SKFile name files to read them from instead
	// (HUAWEICLOUD_SDK_AK_FILE, HUAWEICLOUD_SDK_SK_FILE).
	AK     string
	SK     string
	AKFile string
	SKFile string
	// SecurityToken goes with a temporary AK/SK as X-Security-Token
	// (HUAWEICLOUD_SDK_SECURITY_TOKEN).
	SecurityToken string
	// AuthToken is an IAM token sent as X-Auth-Token instead of signing
	// (DLF_AUTH_TOKEN); AuthTokenFile names a file to read it from
	// (DLF_AUTH_TOKEN_FILE).
	AuthToken     string
	AuthTokenFile string
	// ProjectID is used when a command has none (HUAWEICLOUD_SDK_PROJECT_ID).
	ProjectID string
	// Workspace is used when a command has none (DLF_WORKSPACE).
	Workspace string
	// Timeout bounds one DLF call (DLF_TIMEOUT).
	Timeout time.Duration
}

// Retry is the backoff between DLF attempts.
type Retry struct {
	InitialInterval time.Duration // RETRY_INITIAL_INTERVAL, first backoff
	MaxInterval     time.Duration // RETRY_MAX_INTERVAL, backoff cap
	MaxElapsed      time.Duration // RETRY_MAX_ELAPSED, from when the command was stored
}

// Defaults of the contract.
const (
	DefaultNATSURL              = "nats://127.0.0.1:4222"
	DefaultStopSubject          = "dlf.stop.request"
	DefaultStopStream           = "DLF_STOP"
	DefaultOutcomeSubjectPrefix = "dlf.stop.outcome"
	DefaultOutcomeStream        = "DLF_STOP_OUTCOMES"
	DefaultDeadSubject          = "dlf.stop.dead"
	DefaultDeadStream           = "DLF_STOP_DEAD"
	DefaultConsumerName         = "dlf-stop-worker"
	DefaultStateBucket          = "dlf_stop_state"
	DefaultHTTPAddr             = ":8080"
)

// Default returns the documented defaults. It does not validate: without a
// DLF endpoint or region it is incomplete.
func Default() Config {
	return Config{
		NATS: NATS{URL: DefaultNATSURL},
		Subjects: Subjects{
			StopSubject:          DefaultStopSubject,
			StopStream:           DefaultStopStream,
			OutcomeSubjectPrefix: DefaultOutcomeSubjectPrefix,
			OutcomeStream:        DefaultOutcomeStream,
			DeadSubject:          DefaultDeadSubject,
			DeadStream:           DefaultDeadStream,
			ConsumerName:         DefaultConsumerName,
			StateBucket:          DefaultStateBucket,
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
		StateTTL:          24 * time.Hour,
		HTTPAddr:          DefaultHTTPAddr,
		LogLevel:          "info",
		LogFormat:         "json",
	}
}

// EndpointURL is the DLF base URL: Endpoint, or the one derived from Region
// when Endpoint is empty, or "" when both are empty.
func (d DLF) EndpointURL() string {
	if d.Endpoint != "" {
		return d.Endpoint
	}
	if d.Region != "" {
		return "https://dayu-dlf." + d.Region + ".myhuaweicloud.com"
	}
	return ""
}

// Unauthenticated reports that no DLF credentials are configured, so requests
// go out unsigned (see the package documentation).
func (d DLF) Unauthenticated() bool {
	return d.AK == "" && d.AKFile == "" && d.SK == "" && d.SKFile == "" &&
		d.AuthToken == "" && d.AuthTokenFile == ""
}

// Validate checks every field and returns all problems joined, each naming
// its environment variable. It opens the files named by path fields.
func (c Config) Validate() error {
	return errors.Join(c.problems()...)
}

func (c Config) problems() []error {
	var p problems
	p.merge(c.NATS.problems())
	p.merge(c.Subjects.problems())
	p.merge(c.DLF.problems())
	p.positive("RETRY_INITIAL_INTERVAL", c.Retry.InitialInterval)
	p.positive("RETRY_MAX_INTERVAL", c.Retry.MaxInterval)
	p.positive("RETRY_MAX_ELAPSED", c.Retry.MaxElapsed)
	if c.Retry.InitialInterval > 0 && c.Retry.MaxInterval > 0 && c.Retry.MaxInterval < c.Retry.InitialInterval {
		p.add("RETRY_MAX_INTERVAL", "must be >= RETRY_INITIAL_INTERVAL (%s < %s)", c.Retry.MaxInterval, c.Retry.InitialInterval)
	}
	if c.WorkerConcurrency < 1 || c.WorkerConcurrency > 4096 {
		p.add("WORKER_CONCURRENCY", "must be between 1 and 4096, got %d", c.WorkerConcurrency)
	}
	p.positive("SHUTDOWN_TIMEOUT", c.ShutdownTimeout)
	p.rate(c.RateLimit, c.RateBurst)
	p.positive("STATE_TTL", c.StateTTL)
	if c.StateTTL > 0 && c.Retry.MaxElapsed > 0 && c.StateTTL < c.Retry.MaxElapsed {
		p.add("STATE_TTL", "must be >= RETRY_MAX_ELAPSED (%s < %s): a command's state must outlive its retries", c.StateTTL, c.Retry.MaxElapsed)
	}
	p.httpAddr(c.HTTPAddr)
	p.logLevel(c.LogLevel)
	if c.LogFormat != "json" && c.LogFormat != "console" {
		p.add("LOG_FORMAT", "must be json or console, got %q", c.LogFormat)
	}
	return p
}

// Validate checks the NATS settings alone (see Config.Validate).
func (n NATS) Validate() error { return errors.Join(n.problems()...) }

// Validate checks the subject, stream, consumer and bucket names alone.
func (s Subjects) Validate() error { return errors.Join(s.problems()...) }

// Validate checks the DLF settings alone (see Config.Validate).
func (d DLF) Validate() error { return errors.Join(d.problems()...) }

// Redacted returns the configuration keyed by environment variable name,
// safe to log: secrets that are set show as "[redacted]", unset values as
// "", URLs without user information. DLF_ENDPOINT is the effective endpoint.
func (c Config) Redacted() map[string]string {
	m := make(map[string]string, len(vars))
	for _, v := range vars {
		m[v.name] = v.show(&c)
	}
	return m
}

// String shows the NATS settings with secrets redacted.
func (n NATS) String() string { return groupString(Config{NATS: n}, groupNATS) }

// GoString is String, so %#v does not print secrets either.
func (n NATS) GoString() string { return n.String() }

// MarshalJSON encodes the NATS settings with secrets redacted, keyed by
// environment variable name.
func (n NATS) MarshalJSON() ([]byte, error) {
	return json.Marshal(groupMap(Config{NATS: n}, groupNATS))
}

// String shows the DLF settings with secrets redacted.
func (d DLF) String() string { return groupString(Config{DLF: d}, groupDLF) }

// GoString is String, so %#v does not print secrets either.
func (d DLF) GoString() string { return d.String() }

// MarshalJSON encodes the DLF settings with secrets redacted, keyed by
// environment variable name.
func (d DLF) MarshalJSON() ([]byte, error) {
	return json.Marshal(groupMap(Config{DLF: d}, groupDLF))
}

func groupMap(c Config, g group) map[string]string {
	m := map[string]string{}
	for _, v := range vars {
		if v.group == g {
			m[v.name] = v.show(&c)
		}
	}
	return m
}

func groupString(c Config, g group) string {
	m := groupMap(c, g)
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s:%q", k, m[k])
	}
	b.WriteByte('}')
	return b.String()
}
