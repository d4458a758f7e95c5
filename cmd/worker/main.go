// Command worker consumes DLF stop commands from NATS JetStream and stops
// DataArts Studio script instances. See the README for the contract.
//
//	worker        run the worker, configured from the environment
//	worker dev    run NATS, a DLF emulator and the worker on this machine
//	worker stop   publish one stop command and print its outcome
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/devenv"
	"github.com/dlf-stop/worker/internal/logging"
	"github.com/dlf-stop/worker/internal/service"
	"github.com/dlf-stop/worker/internal/stopcli"
)

const usage = `usage:
  worker          run the worker (configuration from the environment)
  worker dev      run an embedded NATS, a DLF emulator and the worker
  worker stop --script S --instance I [--project P] [--workspace W] [--id ID] [--wait D]
                  publish one stop command and print its outcome
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := realMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func realMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	sub := ""
	if len(args) > 0 {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "":
		return exitOn(stopped(ctx, runWorker(ctx)), stderr)
	case "dev":
		// It takes no arguments: `worker dev --help` must not start
		// servers.
		if len(args) > 0 {
			if a := args[0]; a == "-h" || a == "--help" || a == "help" {
				fmt.Fprint(stdout, usage)
				return 0
			}
			fmt.Fprintf(stderr, "worker dev: unexpected argument %q\n%s", args[0], usage)
			return 64
		}
		return exitOn(stopped(ctx, devenv.Run(ctx, stdout)), stderr)
	case "stop":
		return stopcli.Run(ctx, args, os.LookupEnv, stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "worker: unknown command %q\n%s", sub, usage)
		return 64
	}
}

func runWorker(ctx context.Context) error {
	cfg, err := config.FromEnv(os.LookupEnv)
	if err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}
	log, err := logging.New(cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	return service.Run(ctx, cfg, log, service.Hooks{})
}

// stopped drops an error that the stop signal itself caused: SIGINT or
// SIGTERM while still starting (connecting to NATS, setting up streams) is
// a requested stop, and a requested stop exits 0 (contract section 8).
func stopped(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func exitOn(err error, stderr io.Writer) int {
	if err != nil {
		fmt.Fprintf(stderr, "worker: %v\n", err)
		return 1
	}
	return 0
}
