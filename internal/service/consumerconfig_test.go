package service

import (
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/config"
)

// Every variable of contract sections 2 and 7 that the processing loop
// reads reaches it: the loop's own tests build its Config directly, so a
// mapping dropped here would go unnoticed (found by review: eleven of
// them could be deleted with every test passing). Each value differs from
// its default.
func TestConsumerConfigMapsEveryVariable(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"DLF_ENDPOINT": "http://127.0.0.1:9", "HUAWEICLOUD_SDK_PROJECT_ID": "p", "DLF_WORKSPACE": "w",
		"STOP_SUBJECT": "a.stop", "STOP_STREAM": "AS", "CONSUMER_NAME": "ac",
		"OUTCOME_SUBJECT_PREFIX": "a.out", "OUTCOME_STREAM": "AO",
		"DEAD_SUBJECT": "a.dead", "DEAD_STREAM": "AD",
		"STATE_BUCKET": "ab", "STATE_TTL": "2h", "STREAM_REPLICAS": "3",
		"DLF_RATE_LIMIT": "7", "DLF_RATE_BURST": "9",
		"RETRY_INITIAL_INTERVAL": "1s", "RETRY_MAX_INTERVAL": "2s", "RETRY_MAX_ELAPSED": "3m",
		"WORKER_CONCURRENCY": "5", "DLF_TIMEOUT": "4s", "SHUTDOWN_TIMEOUT": "6s",
	}
	cfg, err := config.FromEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatal(err)
	}
	c := ConsumerConfig(cfg, "worker-7")
	for _, f := range []struct {
		name      string
		got, want any
	}{
		{"STOP_SUBJECT", c.StopSubject, "a.stop"},
		{"STOP_STREAM", c.StopStream, "AS"},
		{"CONSUMER_NAME", c.ConsumerName, "ac"},
		{"OUTCOME_SUBJECT_PREFIX", c.OutcomePrefix, "a.out"},
		{"OUTCOME_STREAM", c.OutcomeStream, "AO"},
		{"DEAD_SUBJECT", c.DeadSubject, "a.dead"},
		{"DEAD_STREAM", c.DeadStream, "AD"},
		{"STATE_BUCKET", c.StateBucket, "ab"},
		{"STATE_TTL", c.StateTTL, 2 * time.Hour},
		{"STREAM_REPLICAS", c.Replicas, 3},
		{"DLF_RATE_LIMIT", c.RateLimit, 7.0},
		{"DLF_RATE_BURST", c.RateBurst, 9},
		{"RETRY_INITIAL_INTERVAL", c.RetryInitial, time.Second},
		{"RETRY_MAX_INTERVAL", c.RetryMax, 2 * time.Second},
		{"RETRY_MAX_ELAPSED", c.RetryMaxElapsed, 3 * time.Minute},
		{"WORKER_CONCURRENCY", c.Concurrency, 5},
		{"DLF_TIMEOUT", c.CallTimeout, 4 * time.Second},
		{"SHUTDOWN_TIMEOUT", c.ShutdownTimeout, 6 * time.Second},
		{"HUAWEICLOUD_SDK_PROJECT_ID", c.Defaults.ProjectID, "p"},
		{"DLF_WORKSPACE", c.Defaults.Workspace, "w"},
		{"worker id", c.WorkerID, "worker-7"},
	} {
		if f.got != f.want {
			t.Errorf("%s: the loop gets %v (%T), want %v", f.name, f.got, f.got, f.want)
		}
	}
}
