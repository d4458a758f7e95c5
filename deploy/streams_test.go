package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/dlf-stop/worker/internal/config"
)

// streamsDir holds the stream and consumer definitions, in the JSON that
// `nats stream add --config` and `nats consumer add --config` read.
const streamsDir = "nats/streams"

// consumerFile is the durable consumer's definition.
const consumerFile = "dlf-stop-worker.json"

// jetStreamDefaultDuplicates is JetStream's default duplicate window, which
// the contract asks for.
const jetStreamDefaultDuplicates = 2 * time.Minute

// wantStream is what the contract (section 2) fixes for one stream.
type wantStream struct {
	name      string
	subjects  []string
	retention server.RetentionPolicy
	keepsFor  bool // has a max_age: audit data that ages out
}

// Names fixed by the contract (section 2); nats-server.conf grants them.
const (
	stopStream    = "DLF_STOP"
	stopSubject   = "dlf.stop.request"
	outcomeStream = "DLF_STOP_OUTCOMES"
	outcomePrefix = "dlf.stop.outcome"
	deadStream    = "DLF_STOP_DEAD"
	deadSubject   = "dlf.stop.dead"
	consumerName  = "dlf-stop-worker"
	stateBucket   = "dlf_stop_state"
)

func wantStreams() []wantStream {
	return []wantStream{
		{stopStream, []string{stopSubject}, server.WorkQueuePolicy, false},
		{outcomeStream, []string{outcomePrefix + ".*"}, server.LimitsPolicy, true},
		{deadStream, []string{deadSubject}, server.LimitsPolicy, true},
	}
}

// TestContractNamesMatchWorkerDefaults: the definitions and permissions
// here are written for the contract's names; the worker must default to
// the same ones.
func TestContractNamesMatchWorkerDefaults(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{config.DefaultStopStream, stopStream},
		{config.DefaultStopSubject, stopSubject},
		{config.DefaultOutcomeStream, outcomeStream},
		{config.DefaultOutcomeSubjectPrefix, outcomePrefix},
		{config.DefaultDeadStream, deadStream},
		{config.DefaultDeadSubject, deadSubject},
		{config.DefaultConsumerName, consumerName},
		{config.DefaultStateBucket, stateBucket},
	} {
		if c.got != c.want {
			t.Errorf("worker default %q, contract %q", c.got, c.want)
		}
	}
}

// decodeStrict decodes JSON into the server's own type, refusing unknown
// fields (the server would silently ignore a misspelt one) and trailing data.
func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after the JSON object")
	}
	return nil
}

// jsonName renders an enum the way the definition files spell it.
func jsonName(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return strings.Trim(string(b), `"`)
}

func readStreamFiles(t *testing.T) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(streamsDir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = data
	}
	return out
}

// streamProblems checks the stream definitions against the contract and
// against the worker's ConfigMap (STREAM_REPLICAS).
func streamProblems(files map[string][]byte, replicas int) []string {
	var out []string
	for _, w := range wantStreams() {
		file := w.name + ".json"
		data, ok := files[file]
		if !ok {
			out = append(out, fmt.Sprintf("%s: missing", file))
			continue
		}
		var sc server.StreamConfig
		if err := decodeStrict(data, &sc); err != nil {
			out = append(out, fmt.Sprintf("%s: %v", file, err))
			continue
		}
		bad := func(format string, args ...any) {
			out = append(out, fmt.Sprintf("%s: ", file)+fmt.Sprintf(format, args...))
		}
		if sc.Name != w.name {
			bad("name %q, want %q", sc.Name, w.name)
		}
		if !slices.Equal(sc.Subjects, w.subjects) {
			bad("subjects %q, want %q", sc.Subjects, w.subjects)
		}
		if sc.Retention != w.retention {
			bad("retention %s, want %s", jsonName(sc.Retention), jsonName(w.retention))
		}
		if sc.Storage != server.FileStorage {
			bad("storage %s, want file", jsonName(sc.Storage))
		}
		if sc.Replicas != replicas {
			bad("num_replicas %d, want STREAM_REPLICAS (%d)", sc.Replicas, replicas)
		}
		if sc.Duplicates != jetStreamDefaultDuplicates {
			bad("duplicate_window %s, want %s", sc.Duplicates, jetStreamDefaultDuplicates)
		}
		if sc.Discard != server.DiscardOld {
			bad("discard %s, want old", jsonName(sc.Discard))
		}
		if sc.NoAck {
			bad("no_ack: the worker publishes with stored acks")
		}
		switch {
		case w.keepsFor && sc.MaxAge <= 0:
			bad("max_age must be set: audit data ages out")
		case !w.keepsFor && (sc.MaxAge > 0 || sc.MaxMsgs > 0 || sc.MaxBytes > 0 || sc.MaxMsgsPer > 0):
			// A limit on the work queue drops commands nobody decided,
			// with no outcome and no dead letter.
			bad("must not limit age, messages or bytes: a dropped command gets no outcome")
		}
	}
	for f := range files {
		if f == consumerFile {
			continue
		}
		known := false
		for _, w := range wantStreams() {
			known = known || f == w.name+".json"
		}
		if !known {
			out = append(out, fmt.Sprintf("%s: not a stream of the contract", f))
		}
	}
	return out
}

// consumerProblems checks the durable consumer: a pull consumer named as
// the worker binds it, explicit acks, the contract's ack wait, unbounded
// redelivery, and room for every replica's commands.
func consumerProblems(files map[string][]byte, workers, concurrency int) []string {
	data, ok := files[consumerFile]
	if !ok {
		return []string{consumerFile + ": missing"}
	}
	var cc server.ConsumerConfig
	if err := decodeStrict(data, &cc); err != nil {
		return []string{fmt.Sprintf("%s: %v", consumerFile, err)}
	}
	var out []string
	bad := func(format string, args ...any) {
		out = append(out, consumerFile+": "+fmt.Sprintf(format, args...))
	}
	if cc.Durable != consumerName || cc.Name != consumerName {
		bad("durable_name %q and name %q, want both %q", cc.Durable, cc.Name, consumerName)
	}
	if cc.DeliverSubject != "" {
		bad("deliver_subject %q makes it a push consumer; the worker needs a pull consumer", cc.DeliverSubject)
	}
	if cc.AckPolicy != server.AckExplicit {
		bad("ack_policy %s, want explicit", jsonName(cc.AckPolicy))
	}
	if cc.AckWait != 30*time.Second {
		bad("ack_wait %s, want 30s", cc.AckWait)
	}
	if cc.DeliverPolicy != server.DeliverAll {
		bad("deliver_policy %s, want all", jsonName(cc.DeliverPolicy))
	}
	if cc.FilterSubject != stopSubject || len(cc.FilterSubjects) > 0 {
		bad("filter_subject %q (filter_subjects %q), want %q", cc.FilterSubject, cc.FilterSubjects, stopSubject)
	}
	if cc.MaxDeliver > 0 {
		// Giving up is RETRY_MAX_ELAPSED's job; a count would drop a
		// command silently, with no outcome.
		bad("max_deliver %d, want -1 (unbounded)", cc.MaxDeliver)
	}
	if len(cc.BackOff) > 0 {
		bad("backoff is set; the worker schedules redeliveries itself (nak with delay)")
	}
	// Each worker holds up to max(512, 4 x WORKER_CONCURRENCY) commands
	// (state reads, calls, in-process waits, publishing, the pull
	// buffer); max_ack_pending counts across all of them.
	if need := workers * max(512, 4*concurrency); cc.MaxAckPending < need {
		bad("max_ack_pending %d, want at least %d (%d replicas x max(512, 4 x WORKER_CONCURRENCY %d))", cc.MaxAckPending, need, workers, concurrency)
	}
	return out
}

// workerScale reads replicas and WORKER_CONCURRENCY / STREAM_REPLICAS from
// the manifests.
func workerScale(t *testing.T) (workers, concurrency, streamReplicas int) {
	t.Helper()
	ms := loadManifests(t)
	dep, c, err := workerDeployment(ms)
	if err != nil {
		t.Fatal(err)
	}
	workers, _ = intAt(dep.obj, "spec", "replicas")
	env, _ := containerEnv(ms, c)
	atoi := func(name string, def int) int {
		s, ok := env[name]
		if !ok {
			return def
		}
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("%s=%q: %v", name, s, err)
		}
		return n
	}
	d := config.Default()
	return workers, atoi("WORKER_CONCURRENCY", d.WorkerConcurrency), atoi("STREAM_REPLICAS", d.Subjects.StreamReplicas)
}

func TestStreamDefinitions(t *testing.T) {
	_, _, replicas := workerScale(t)
	reportProblems(t, streamProblems(readStreamFiles(t), replicas))
}

func TestConsumerDefinition(t *testing.T) {
	workers, concurrency, _ := workerScale(t)
	reportProblems(t, consumerProblems(readStreamFiles(t), workers, concurrency))
}

// TestStreamChecksCatchBadDefinitions changes one field at a time and
// expects the checks to name it.
func TestStreamChecksCatchBadDefinitions(t *testing.T) {
	files := readStreamFiles(t)
	workers, concurrency, replicas := workerScale(t)
	if p := append(streamProblems(files, replicas), consumerProblems(files, workers, concurrency)...); len(p) > 0 {
		t.Fatalf("definitions as shipped have problems: %v", p)
	}
	set := func(file, field string, value any) func(map[string][]byte) {
		return func(fs map[string][]byte) {
			var m map[string]any
			if err := json.Unmarshal(fs[file], &m); err != nil {
				t.Fatal(err)
			}
			if value == nil {
				delete(m, field)
			} else {
				m[field] = value
			}
			b, err := json.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			fs[file] = b
		}
	}
	cases := []struct {
		name   string
		mutate func(map[string][]byte)
		want   string
	}{
		{"work queue with limits retention", set("DLF_STOP.json", "retention", "limits"), "retention limits, want workqueue"},
		{"wrong stop subject", set("DLF_STOP.json", "subjects", []string{"dlf.stop.requests"}), `subjects ["dlf.stop.requests"]`},
		{"outcome subjects too narrow", set("DLF_STOP_OUTCOMES.json", "subjects", []string{"dlf.stop.outcome.stopped"}), "DLF_STOP_OUTCOMES.json: subjects"},
		{"renamed stream", set("DLF_STOP_DEAD.json", "name", "DLF_DEAD"), `name "DLF_DEAD"`},
		{"memory storage", set("DLF_STOP_DEAD.json", "storage", "memory"), "storage memory"},
		{"single replica", set("DLF_STOP_OUTCOMES.json", "num_replicas", 1), "num_replicas 1"},
		{"other duplicate window", set("DLF_STOP.json", "duplicate_window", 60000000000), "duplicate_window 1m0s"},
		{"discard new", set("DLF_STOP_DEAD.json", "discard", "new"), "discard new"},
		{"outcomes kept forever", set("DLF_STOP_OUTCOMES.json", "max_age", 0), "max_age must be set"},
		{"work queue that expires commands", set("DLF_STOP.json", "max_age", 3600000000000), "must not limit age"},
		{"misspelt field", set("DLF_STOP.json", "max_ages", 1), `unknown field "max_ages"`},
		{"invalid retention", set("DLF_STOP.json", "retention", "work_queue"), "DLF_STOP.json:"},
		{"missing stream file", func(fs map[string][]byte) { delete(fs, "DLF_STOP_DEAD.json") }, "DLF_STOP_DEAD.json: missing"},
		{"push consumer", set(consumerFile, "deliver_subject", "deliver.dlf"), "push consumer"},
		{"ack none", set(consumerFile, "ack_policy", "none"), "ack_policy none"},
		{"ack wait 10s", set(consumerFile, "ack_wait", 10000000000), "ack_wait 10s"},
		{"other durable", set(consumerFile, "durable_name", "worker"), `durable_name "worker"`},
		{"ephemeral", set(consumerFile, "durable_name", nil), `durable_name ""`},
		{"bounded redelivery", set(consumerFile, "max_deliver", 5), "max_deliver 5"},
		{"small max_ack_pending", set(consumerFile, "max_ack_pending", 64), "max_ack_pending 64"},
		{"other filter", set(consumerFile, "filter_subject", "dlf.stop.>"), `filter_subject "dlf.stop.>"`},
		{"deliver new", set(consumerFile, "deliver_policy", "new"), "deliver_policy new"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bad := map[string][]byte{}
			for k, v := range files {
				bad[k] = v
			}
			tc.mutate(bad)
			problems := append(streamProblems(bad, replicas), consumerProblems(bad, workers, concurrency)...)
			for _, p := range problems {
				if strings.Contains(p, tc.want) {
					return
				}
			}
			t.Errorf("no problem mentions %q; got %q", tc.want, problems)
		})
	}
}
