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
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, errors.New("embedded nats: not ready within 10s")
	}
	return s, nil
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
