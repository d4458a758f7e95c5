package testutil

import (
	"fmt"
	"strings"
)

// DevBanner is what `worker dev` prints on stdout (internal/devenv): the
// tests of the binary and of the package read the same text.
type DevBanner struct {
	NATSURL   string
	HTTPAddr  string // host:port
	Instances []string
	PubJSON   string   // payload of the `nats pub` line
	StopLine  string   // the `worker stop` line, trimmed
	StopEnv   string   // the NATS URL given on that line
	StopArgs  []string // arguments after `stop` on that line
}

// ParseDevBanner reads the banner, and says what is missing when it is
// incomplete.
func ParseDevBanner(text string) (DevBanner, error) {
	var b DevBanner
	inInstances := false
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\r\n")
		f := strings.Fields(line)
		switch {
		case inInstances && len(f) == 1:
			b.Instances = append(b.Instances, f[0])
			continue
		case inInstances:
			inInstances = false
		}
		switch {
		case strings.HasPrefix(line, "NATS URL:") && len(f) >= 3:
			b.NATSURL = f[2]
		case strings.HasPrefix(line, "HTTP address:") && len(f) >= 3:
			b.HTTPAddr = strings.TrimPrefix(f[2], "http://")
		case strings.HasPrefix(line, "Running instances ready to stop:"):
			inInstances = true
		case strings.Contains(line, " pub dlf.stop.request '"):
			i, j := strings.Index(line, "'"), strings.LastIndex(line, "'")
			if j > i {
				b.PubJSON = line[i+1 : j]
			}
		case strings.Contains(line, " stop --script "):
			b.StopLine = strings.TrimSpace(line)
			if len(f) > 0 && strings.HasPrefix(f[0], "NATS_URL=") {
				b.StopEnv = strings.TrimPrefix(f[0], "NATS_URL=")
			}
			_, after, _ := strings.Cut(line, " stop ")
			b.StopArgs = strings.Fields(after)
		}
	}
	if b.NATSURL == "" || b.HTTPAddr == "" || len(b.Instances) == 0 || b.PubJSON == "" || b.StopArgs == nil {
		return b, fmt.Errorf("banner incomplete (%+v):\n%s", b, text)
	}
	return b, nil
}
