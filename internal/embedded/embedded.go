// Package embedded runs a NATS server with JetStream inside this process:
// for `worker dev`, which must need nothing installed, and for tests, which
// must run against a real server rather than a mock.
package embedded

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options for an embedded server. Zero values: 127.0.0.1, a random port,
// a temporary store directory the caller must provide.
type Options struct {
	Host     string
	Port     int    // -1 or 0: random free port
	StoreDir string // required: JetStream file store location
	// ServerName and Cluster set up one node of a cluster (tests of broker
	// faults); Routes lists the other nodes.
	ServerName  string
	ClusterName string
	ClusterPort int
	Routes      []string
}

// Start runs a JetStream server and waits until it accepts connections.
// When the server reports that it cannot start (its port is taken, its
// store directory cannot be created, JetStream does not start), Start
// shuts it down and returns the server's own reason at once, without
// waiting out the readiness timeout. The server's other output is
// dropped.
func Start(o Options) (*server.Server, error) {
	if o.StoreDir == "" {
		return nil, errors.New("embedded: StoreDir is required")
	}
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.Port == 0 {
		o.Port = -1
	}
	opts := &server.Options{
		ServerName: o.ServerName,
		Host:       o.Host,
		Port:       o.Port,
		JetStream:  true,
		StoreDir:   o.StoreDir,
		NoLog:      true,
		NoSigs:     true,
	}
	if o.ClusterName != "" {
		opts.Cluster.Name = o.ClusterName
		opts.Cluster.Host = o.Host
		opts.Cluster.Port = o.ClusterPort
		if len(o.Routes) > 0 {
			opts.Routes = server.RoutesFromStr(strings.Join(o.Routes, ","))
		}
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	log := &startLog{}
	s.SetLoggerV2(log, false, false, false)
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		s.Start()
	}()
	if err := waitReady(s, log, readyWithin); err != nil {
		abort(s, returned)
		return nil, err
	}
	return s, nil
}

const (
	// readyWithin bounds how long Start waits for a server that reports
	// nothing wrong yet does not accept connections.
	readyWithin = 10 * time.Second
	// readyPoll is how long each readiness check waits, and so how soon a
	// failure the server reports ends the wait.
	readyPoll = 50 * time.Millisecond
	// returnGrace bounds how long abort waits for Server.Start to return
	// after the server has been shut down.
	returnGrace = 5 * time.Second
)

// waitReady waits until s accepts connections. It returns the server's
// own reason as soon as the server reports a fatal error (its port is
// taken, its store directory cannot be created, JetStream does not
// start), rather than waiting out the whole time for a readiness that
// will never come.
func waitReady(s *server.Server, log *startLog, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		// ReadyForConnections returns false after readyPoll at the latest.
		ready := s.ReadyForConnections(readyPoll)
		// Read after the readiness: a server that reported a fatal error
		// has not started, even if a listener is up.
		if msg := log.fatalMessage(); msg != "" {
			return fmt.Errorf("embedded nats: %s", msg)
		}
		if ready {
			return nil
		}
		if time.Now().After(deadline) {
			if msg := log.lastError(); msg != "" {
				return fmt.Errorf("embedded nats: not ready within %s, last error: %s", within, msg)
			}
			return fmt.Errorf("embedded nats: not ready within %s", within)
		}
	}
}

// abort shuts down a server that did not start, and waits for its Start
// goroutine so that a failed Start leaves nothing running. After a fatal
// error Server.Start returns at once; the wait is bounded for a server
// that timed out while still starting.
func abort(s *server.Server, returned <-chan struct{}) {
	s.Shutdown()
	s.WaitForShutdown()
	grace := time.NewTimer(returnGrace)
	defer grace.Stop()
	select {
	case <-returned:
	case <-grace.C:
	}
}

// PortOrFree returns want when it can be bound on host, else -1 so the
// server picks a free port (worker dev prefers 4222 but must not fail when
// a real NATS already runs there).
func PortOrFree(host string, want int) int {
	l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(want)))
	if err != nil {
		return -1
	}
	_ = l.Close()
	return want
}
