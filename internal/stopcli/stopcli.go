// Package stopcli is `worker stop`: publish one stop command with the
// worker's NATS settings and print its outcome event when it arrives.
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
// which no outcome event arrived, including NATS being unreachable and the
// command not being stored: the caller learns nothing about the instance
// and may try again; ExitOther means an outcome said it was not stopped.
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
	if *id == "" {
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
	out, code, err := publishAndWait(ctx, cfg, *id, body, *wait)
	if err != nil {
		fmt.Fprintf(stderr, "worker stop: %v\n", err)
		return code
	}
	fmt.Fprintln(stdout, string(out))
	var o struct {
		Status string `json:"status"`
	}
	if json.Unmarshal(out, &o) == nil && o.Status == "stopped" {
		return ExitStopped
	}
	return ExitOther
}

func publishAndWait(ctx context.Context, cfg config.Config, id string, body []byte, wait time.Duration) ([]byte, int, error) {
	tctx, cancelTimeout := context.WithTimeout(ctx, wait)
	defer cancelTimeout()
	// The server reports a publish or subscription the user may not make
	// only as an asynchronous error; without it, a user without the right
	// (the worker's own, say) would wait out --wait and hear only of the
	// timeout. It ends the wait at once, named.
	ctx, cancel := context.WithCancelCause(tctx)
	defer cancel(nil)
	nc, err := natsconn.Connect(ctx, cfg.NATS, zap.NewNop(), "dlf-stop-worker stop")
	if err != nil {
		return nil, ExitNoOutcome, err
	}
	defer nc.Close()
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) {
			cancel(err)
		}
	})
	const needs = "a scheduler's user publishes stop commands and hears outcomes; see deploy/nats/nats-server.conf"
	denied := func() error {
		if cause := context.Cause(ctx); errors.Is(cause, nats.ErrPermissionViolation) {
			return fmt.Errorf("the NATS user may not do this (%s): %w", needs, cause)
		}
		return nil
	}
	// Subscribe before publishing so the outcome cannot slip past. The
	// outcome carries the command id as Nats-Msg-Id.
	got := make(chan []byte, 1)
	sub, err := nc.Subscribe(cfg.Subjects.OutcomeSubjectPrefix+".*", func(m *nats.Msg) {
		if m.Header.Get(nats.MsgIdHdr) == id {
			select {
			case got <- m.Data:
			default:
			}
		}
	})
	if err != nil {
		return nil, ExitNoOutcome, fmt.Errorf("subscribe to outcomes: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.Flush(); err != nil {
		return nil, ExitNoOutcome, fmt.Errorf("subscribe to outcomes: %w", err)
	}
	// The server refuses a subscription before it answers the flush, and
	// nats.go records that as the last error before the flush returns
	// (the handler above may run later): a user that may not hear the
	// outcome learns it before anything is published.
	if err := nc.LastError(); errors.Is(err, nats.ErrPermissionViolation) {
		return nil, ExitNoOutcome, fmt.Errorf("subscribe to outcomes: nothing was published: the NATS user may not hear outcomes (%s): %w", needs, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, ExitNoOutcome, err
	}
	m := nats.NewMsg(cfg.Subjects.StopSubject)
	m.Data = body
	m.Header.Set(nats.MsgIdHdr, id)
	ack, err := js.PublishMsg(ctx, m)
	if err != nil {
		if d := denied(); d != nil {
			err = d
		}
		return nil, ExitNoOutcome, fmt.Errorf("publish to %s: %w", cfg.Subjects.StopSubject, err)
	}
	if ack.Duplicate {
		return nil, ExitNoOutcome, fmt.Errorf("command id %s was published within the duplicate window already; its outcome was sent then", id)
	}
	select {
	case out := <-got:
		return out, 0, nil
	case <-ctx.Done():
		if d := denied(); d != nil {
			return nil, ExitNoOutcome, fmt.Errorf("command %s was published (stream sequence %d), but waiting for its outcome failed: %w", id, ack.Sequence, d)
		}
		// An id decided before the duplicate window is acked without a
		// new outcome (contract section 6) for as long as the state
		// bucket remembers it: say so, as nothing else will.
		return nil, ExitNoOutcome, fmt.Errorf("no outcome for command %s within %s (an id the worker decided before gets no new outcome while its state bucket remembers it, STATE_TTL: leave --id out to send a new command)", id, wait)
	}
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "stop-" + hex.EncodeToString(b[:])
}
