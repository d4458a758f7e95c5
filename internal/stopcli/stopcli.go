// Package stopcli is `worker stop`: publish one stop command with the
// worker's NATS settings and print its outcome event once the outcome
// stream holds it.
package stopcli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/natsconn"
)

// Exit statuses (contract section 8). ExitNoOutcome covers every case in
// which no outcome event arrived, including NATS being unreachable, the
// command not being stored, --wait running out and an interrupt (Ctrl-C,
// SIGTERM): the caller learns nothing about the instance and may try
// again; ExitOther means an outcome said it was not stopped.
const (
	ExitStopped   = 0
	ExitOther     = 1
	ExitNoOutcome = 2
	ExitUsage     = 64
)

// Run parses args, publishes the command, waits for its outcome and returns
// the exit status. lookup reads the environment (os.LookupEnv in main).
func Run(ctx context.Context, args []string, lookup func(string) (string, bool), stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("worker stop", flag.ContinueOnError)
	fs.SetOutput(stderr)
	script := fs.String("script", "", "script name (required)")
	instance := fs.String("instance", "", "instance id (required)")
	project := fs.String("project", "", "project id (default: HUAWEICLOUD_SDK_PROJECT_ID as the worker applies it)")
	workspace := fs.String("workspace", "", "workspace id (default: DLF_WORKSPACE as the worker applies it)")
	id := fs.String("id", "", "command id (default: a random one)")
	wait := fs.Duration("wait", 30*time.Second, "how long to wait for the outcome")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return ExitStopped // asked for the usage, which was printed: not bad usage
		}
		return ExitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "worker stop: unexpected arguments %v\n", fs.Args())
		return ExitUsage
	}
	if *script == "" || *instance == "" {
		fmt.Fprintln(stderr, "worker stop: --script and --instance are required")
		fs.Usage()
		return ExitUsage
	}
	if *wait <= 0 {
		fmt.Fprintln(stderr, "worker stop: --wait must be positive")
		return ExitUsage
	}
	idGiven := *id != ""
	if !idGiven {
		*id = newID()
	} else if !command.ValidID(*id) {
		fmt.Fprintln(stderr, "worker stop: --id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
		return ExitUsage
	}
	// Only NATS settings and subject names matter here; the DLF part of
	// the configuration belongs to the worker and is not required.
	cfg, err := config.LoadNATS(lookup)
	if err != nil {
		fmt.Fprintf(stderr, "worker stop: %v\n", err)
		return ExitUsage
	}
	// Streams are the worker's to create: their replica count is none of
	// this command's business, even when it is out of range.
	cfg.Subjects.StreamReplicas = config.Default().Subjects.StreamReplicas
	if err := errors.Join(cfg.NATS.Validate(), cfg.Subjects.Validate()); err != nil {
		fmt.Fprintf(stderr, "worker stop: %v\n", err)
		return ExitUsage
	}
	cmd := map[string]string{"command_id": *id, "script_name": *script, "instance_id": *instance}
	if *project != "" {
		cmd["project_id"] = *project
	}
	if *workspace != "" {
		cmd["workspace"] = *workspace
	}
	body, err := json.Marshal(cmd)
	if err != nil {
		fmt.Fprintf(stderr, "worker stop: %v\n", err)
		return ExitOther
	}
	// A value the worker would reject is bad usage, not a command to
	// dead-letter (found by review: a typo became a rejected outcome).
	// The project is checked as given; a default is the worker's to apply.
	var verr *command.ValidationError
	if _, err := command.Decode(body, command.Meta{}, command.Defaults{ProjectID: "checked-by-the-worker"}); errors.As(err, &verr) {
		fmt.Fprintf(stderr, "worker stop: --%s %s\n", flagOf[verr.Field], verr.Rule)
		return ExitUsage
	}
	res, err := publishAndWait(ctx, cfg, *id, idGiven, body, *wait)
	if err != nil {
		fmt.Fprintf(stderr, "worker stop: %v\n", err)
		if errors.Is(err, natsconn.ErrSettings) {
			return ExitUsage // nothing was published, and a rerun would fail the same way
		}
		return ExitNoOutcome
	}
	var o struct {
		Status     string `json:"status"`
		ProjectID  string `json:"project_id"`
		Workspace  string `json:"workspace"`
		ScriptName string `json:"script_name"`
		InstanceID string `json:"instance_id"`
	}
	parsed := json.Unmarshal(res.outcome, &o) == nil
	// The outcome found under the id may be another command's, for
	// another instance: a command published again within the duplicate
	// window is dropped in favour of the earlier one, and one published
	// after that window, or by a scheduler that left Nats-Msg-Id out,
	// while the earlier one was still being retried is stored, then acked
	// by the worker as a reused id, without a call and without an outcome
	// of its own (contract section 6). Its outcome says nothing of the
	// instance asked for (found by review: exit 0 for an instance that was
	// never stopped).
	//
	// A project or workspace left out is the worker's default. For a
	// duplicate, which sent nothing, this environment's default is
	// compared when it names one; for a command that was stored, only
	// what the flags name is, so that a default this environment names
	// differently from the worker's cannot make its own outcome look like
	// another's.
	wantProject, wantWorkspace := *project, *workspace
	if res.ack.Duplicate {
		if wantProject == "" {
			wantProject, _ = lookup("HUAWEICLOUD_SDK_PROJECT_ID")
		}
		if wantWorkspace == "" {
			wantWorkspace, _ = lookup("DLF_WORKSPACE")
		}
	}
	// A rejected outcome leaves out the fields that broke their rule. The
	// flags given were checked before publishing, so only a default the
	// worker applied (a project or workspace left out) can be what broke
	// it and still be this command (found by review: the same line run
	// twice read as another instance).
	rejected := o.Status == "rejected"
	sameDefault := func(got, want string, flagGiven bool) bool {
		return got == want || (rejected && got == "" && !flagGiven)
	}
	if !parsed || o.ScriptName != *script || o.InstanceID != *instance ||
		(wantProject != "" && !sameDefault(o.ProjectID, wantProject, *project != "")) ||
		(wantWorkspace != "" && !sameDefault(o.Workspace, wantWorkspace, *workspace != "")) {
		if res.ack.Duplicate {
			fmt.Fprintf(stderr, "worker stop: %s, and that command was for another instance (project %q, workspace %q, script %q, instance %q): nothing was sent for this one; leave --id out to send a new command\n",
				duplicated(*id, res.ack), o.ProjectID, o.Workspace, o.ScriptName, o.InstanceID)
		} else {
			fmt.Fprintf(stderr, "worker stop: command id %s is another command's, for another instance (project %q, workspace %q, script %q, instance %q), whose outcome this was; the worker takes the id as reused and stops nothing for this one; leave --id out to send a new command\n",
				*id, o.ProjectID, o.Workspace, o.ScriptName, o.InstanceID)
		}
		return ExitNoOutcome
	}
	if res.ack.Duplicate {
		fmt.Fprintf(stderr, "worker stop: %s; the outcome printed is that command's\n", duplicated(*id, res.ack))
	}
	fmt.Fprintln(stdout, string(res.outcome))
	if parsed && o.Status == "stopped" {
		return ExitStopped
	}
	return ExitOther
}

// flagOf names the flag that sets each field of the command.
var flagOf = map[string]string{"command_id": "id", "project_id": "project", "workspace": "workspace",
	"script_name": "script", "instance_id": "instance"}

// result is what publishAndWait learned: the outcome event, and the
// acknowledgement of the command it belongs to.
type result struct {
	outcome []byte
	ack     *jetstream.PubAck
}

const (
	// duplicateWindow is the stop stream's duplicate window: JetStream's
	// default, which the worker gives the stream it creates and
	// deploy/nats/streams/DLF_STOP.json sets. The user of `worker stop`
	// may not read the stop stream's configuration.
	duplicateWindow = 2 * time.Minute
	// clockSkew allows for the clocks of the nodes of a NATS cluster
	// differing.
	clockSkew = 10 * time.Second
)

// testHookPublished, when a test sets it, runs once the command is stored,
// before the wait for its outcome.
var testHookPublished func()

// publishAndWait publishes the command and waits for its outcome. The
// outcome is read from the outcome stream, not heard as it is published:
// one stored while the connection is down (a server restart, a dropped
// link, lame duck mode) is read once it is back.
func publishAndWait(parent context.Context, cfg config.Config, id string, idGiven bool, body []byte, wait time.Duration) (*result, error) {
	tctx, cancelTimeout := context.WithTimeoutCause(parent, wait, waitRanOut(wait))
	defer cancelTimeout()
	// The server reports a request or subscription the user may not make
	// only as an asynchronous error; without it, a user without the right
	// (the worker's own, say) would wait out --wait and hear only of the
	// timeout. It ends the wait at once, named.
	ctx, cancel := context.WithCancelCause(tctx)
	defer cancel(nil)
	s := &session{parent: parent, ctx: ctx, wait: wait, idGiven: idGiven}
	nc, err := natsconn.Connect(ctx, cfg.NATS, zap.NewNop(), "dlf-stop-worker stop")
	if err != nil {
		if parent.Err() != nil {
			return nil, errors.New("interrupted while connecting to NATS: nothing was published")
		}
		if s.ranOut() != nil {
			// natsconn names the cause: --wait.
			return nil, fmt.Errorf("%w: nothing was published", err)
		}
		return nil, err
	}
	defer nc.Close()
	s.nc = nc
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) {
			cancel(err)
		}
	})
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}

	// Where the outcome stream ends now: this command's outcome can only
	// come after. Reading starts there, before publishing, so the outcome
	// cannot slip past, and a user that may not read the stream learns it
	// before anything is published.
	outcomes := cfg.Subjects.OutcomeStream
	st, err := js.Stream(ctx, outcomes)
	if err != nil {
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			err = fmt.Errorf("%w (the worker creates it when it starts)", err)
		}
		return nil, s.beforePublish("look up outcome stream "+outcomes, err)
	}
	info := st.CachedInfo()
	filter := cfg.Subjects.OutcomeSubjectPrefix + ".*"
	// The ordered consumer deletes the consumer it replaces after a
	// reconnect, and this run deletes its own at the end. A user that may
	// not would lose the wait at the first reconnect: it learns it now,
	// from deleting a consumer that does not exist.
	if err := js.DeleteConsumer(ctx, outcomes, "worker-stop-probe-"+randomHex()); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, s.beforePublish("read outcome stream "+outcomes, err)
	}
	r, err := readOutcomes(ctx, js, outcomes, filter, id, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:   info.State.LastSeq + 1,
	})
	if err != nil {
		return nil, s.beforePublish("read outcome stream "+outcomes, err)
	}
	defer func() { r.stop() }() // r changes on a duplicate
	// The server refuses a request (the first pull) before it answers the
	// flush, and nats.go records that as the last error before the flush
	// returns (the handler above may run later).
	if err := nc.FlushWithContext(ctx); err != nil {
		return nil, s.beforePublish("read outcome stream "+outcomes, err)
	}
	if v := s.violation(); v != nil {
		return nil, s.beforePublish("read outcome stream "+outcomes, v)
	}

	m := nats.NewMsg(cfg.Subjects.StopSubject)
	m.Data = body
	m.Header.Set(nats.MsgIdHdr, id)
	ack, err := js.PublishMsg(ctx, m)
	if err != nil {
		return nil, s.publishFailed(cfg.Subjects.StopSubject, id, err)
	}
	if testHookPublished != nil {
		testHookPublished()
	}
	var since time.Time
	if ack.Duplicate {
		// The same id within the stop stream's duplicate window: JetStream
		// kept the command published then and dropped this one. Its
		// outcome may have been stored before this run looked at the
		// outcome stream, so read from as far back as the window reaches
		// (by the server's clock when it can tell). The ack's sequence is
		// the stop stream's, which says nothing about where in the outcome
		// stream to look.
		since = info.TimeStamp
		if since.IsZero() {
			since = time.Now()
		}
		since = since.Add(-duplicateWindow - clockSkew).UTC()
		r.stop()
		r = nil
		r, err = readOutcomes(ctx, js, outcomes, filter, id, jetstream.OrderedConsumerConfig{
			DeliverPolicy: jetstream.DeliverByStartTimePolicy,
			OptStartTime:  &since,
		})
		if err != nil && ctx.Err() == nil {
			return nil, fmt.Errorf("%s; reading its outcome from %s failed: %w", duplicated(id, ack), outcomes, err)
		}
	}
	if r != nil {
		select {
		case out := <-r.got:
			return &result{outcome: out, ack: ack}, nil
		case <-ctx.Done():
			// Both may be ready at once, and select picks either: an
			// outcome that arrived is the answer, however the wait ended.
			select {
			case out := <-r.got:
				return &result{outcome: out, ack: ack}, nil
			default:
			}
		}
	}
	// For a duplicate's message: when the outcome stream has dropped
	// outcomes from its head (its first sequence is past 1), the time of
	// the oldest it still holds.
	var first time.Time
	if ack.Duplicate && parent.Err() == nil {
		ictx, cancel := context.WithTimeout(parent, 2*time.Second)
		if st, err := js.Stream(ictx, outcomes); err == nil && st.CachedInfo().State.FirstSeq > 1 {
			first = st.CachedInfo().State.FirstTime
		}
		cancel()
	}
	return nil, s.waitFailed(id, ack, since, first, r)
}

func newID() string { return "stop-" + randomHex() }

// randomHex returns 16 random hexadecimal digits.
func randomHex() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
