// Package devenv is `worker dev`: everything on this machine with nothing
// installed. It starts an embedded NATS server with JetStream, the DLF
// emulator with a few running instances, and the worker wired to both, then
// prints how to publish a stop command.
package devenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/embedded"
	"github.com/dlf-stop/worker/internal/logging"
	"github.com/dlf-stop/worker/internal/service"
)

// Demo identifiers printed for the user.
const (
	DemoProject = "demo-project"
	DemoScript  = "demo_script"
)

// Options tune Run for tests; the zero value is what `worker dev` uses.
type Options struct {
	NATSPort  int    // default 4222, or a free port when taken
	HTTPAddr  string // default 127.0.0.1:8080, or a free port when taken
	Logger    *zap.Logger
	Instances int // running instances to create, default (and when <= 0) 3
}

// Run starts the dev environment and blocks until ctx ends.
func Run(ctx context.Context, stdout io.Writer) error {
	return RunWith(ctx, stdout, Options{})
}

// RunWith is Run with options.
func RunWith(ctx context.Context, stdout io.Writer, o Options) error {
	if o.NATSPort == 0 {
		o.NATSPort = embedded.PortOrFree("127.0.0.1", 4222)
	}
	if o.HTTPAddr == "" {
		o.HTTPAddr = "127.0.0.1:8080"
		if l, err := net.Listen("tcp", o.HTTPAddr); err != nil {
			o.HTTPAddr = "127.0.0.1:0"
		} else {
			_ = l.Close()
		}
	}
	if o.Instances <= 0 {
		o.Instances = 3
	}
	log := o.Logger
	if log == nil {
		var err error
		if log, err = logging.New("info", "console"); err != nil {
			return err
		}
		defer func() { _ = log.Sync() }()
	}

	store, err := os.MkdirTemp("", "dlf-stop-dev-*")
	if err != nil {
		return fmt.Errorf("temp store: %w", err)
	}
	defer os.RemoveAll(store)
	ns, err := embedded.Start(embedded.Options{Port: o.NATSPort, StoreDir: store})
	if err != nil {
		return err
	}
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()

	emu := emulator.New(emulator.WithLogger(log.Named("emulator")))
	emuURL, err := emu.Start()
	if err != nil {
		return fmt.Errorf("emulator: %w", err)
	}
	defer emu.Close()
	instances := make([]string, o.Instances)
	for i := range instances {
		instances[i] = emu.Execute(DemoProject, "", DemoScript)
	}

	cfg := config.Default()
	// What the logger above was built with, so that the configuration
	// the worker logs says so (found by review: it said json).
	cfg.LogLevel, cfg.LogFormat = "info", "console"
	cfg.NATS.URL = ns.ClientURL()
	cfg.DLF.Endpoint = emuURL
	cfg.DLF.ProjectID = DemoProject
	cfg.HTTPAddr = o.HTTPAddr
	cfg.ShutdownTimeout = 5 * time.Second
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("dev configuration: %w", err)
	}
	err = service.Run(ctx, cfg, log, service.Hooks{Started: func(httpAddr string) {
		printBanner(stdout, ns.ClientURL(), httpAddr, emuURL, instances)
	}})
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		// Stopped while the worker was still starting (Ctrl-C right after
		// the banner): a requested stop, not a failure.
		return nil
	}
	return err
}

func printBanner(w io.Writer, natsURL, httpAddr, emuURL string, instances []string) {
	var b strings.Builder
	fmt.Fprintf(&b, "dlf-stop worker dev environment is running. Ctrl-C stops it.\n\n")
	fmt.Fprintf(&b, "NATS URL:      %s\n", natsURL)
	fmt.Fprintf(&b, "HTTP address:  http://%s  (/metrics /healthz /readyz)\n", httpAddr)
	fmt.Fprintf(&b, "DLF emulator:  %s  (project %s, script %s)\n\n", emuURL, DemoProject, DemoScript)
	fmt.Fprintf(&b, "Running instances ready to stop:\n")
	for _, id := range instances {
		fmt.Fprintf(&b, "  %s\n", id)
	}
	first := instances[0]
	fmt.Fprintf(&b, "\nWatch outcomes:\n  nats --server %s sub 'dlf.stop.outcome.>'\n", natsURL)
	fmt.Fprintf(&b, "\nPublish a stop command with the nats CLI:\n")
	fmt.Fprintf(&b, "  nats --server %s pub dlf.stop.request '{\"script_name\":\"%s\",\"instance_id\":\"%s\",\"reason\":\"demo\"}'\n",
		natsURL, DemoScript, first)
	if len(instances) > 1 {
		fmt.Fprintf(&b, "\nOr with this binary (prints the outcome):\n")
		fmt.Fprintf(&b, "  NATS_URL=%s %s stop --script %s --instance %s\n", natsURL, selfCommand(), DemoScript, instances[1])
	}
	_, _ = io.WriteString(w, b.String())
}

// selfCommand is how to run this binary from the user's shell: the name it
// was started by when that was looked up in PATH, else its absolute path
// (which stays valid while the dev environment runs, under go run too).
func selfCommand() string {
	name := os.Args[0]
	if strings.ContainsRune(name, filepath.Separator) {
		if exe, err := os.Executable(); err == nil {
			name = exe
		}
	}
	return shellQuote(name)
}

// shellQuote quotes s for a POSIX shell unless it needs no quoting.
func shellQuote(s string) string {
	plain := s != "" && !strings.ContainsFunc(s, func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || strings.ContainsRune("/._-+:,@%=", r))
	})
	if plain {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
