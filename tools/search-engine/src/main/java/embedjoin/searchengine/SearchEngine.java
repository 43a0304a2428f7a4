package embedjoin.searchengine;

import java.io.IOException;
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Comparator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.stream.Stream;

import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.http.HttpServerTransport;
import org.elasticsearch.node.ClasspathPluginsNode;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.node.Node;
import org.elasticsearch.transport.netty4.Netty4Plugin;

/**
 * Starts one real Elasticsearch node for tests and local runs, from the server jar and the
 * transport-netty4 plugin on the classpath (no distribution, no Docker).
 *
 * Contract: the node listens on 127.0.0.1 on a free port; once it answers {@code GET /}, its
 * URL is printed as the one line on stdout (logs go to stderr). It stops, closing the node and
 * deleting a temporary data directory, on SIGTERM or SIGINT, and also on end of stdin when
 * started with {@code --stop-on-eof} (so a harness that dies takes the engine with it).
 *
 * Options: {@code --port N} (default 0: any free port), {@code --data DIR} (default: a
 * temporary directory, removed on exit), {@code --stop-on-eof}.
 */
public final class SearchEngine {
    private static final Duration READY_TIMEOUT = Duration.ofMinutes(3);

    public static void main(String[] args) {
        try {
            run(args);
        } catch (Throwable e) {
            e.printStackTrace();
            // The node's threads would keep the JVM alive: exit, which runs the stop hook.
            System.exit(1);
        }
    }

    private static void run(String[] args) throws Exception {
        int port = 0;
        Path data = null;
        boolean stopOnEof = false;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--port" -> port = Integer.parseInt(args[++i]);
                case "--data" -> data = Path.of(args[++i]).toAbsolutePath();
                case "--stop-on-eof" -> stopOnEof = true;
                default -> {
                    System.err.println("usage: search-engine [--port N] [--data DIR] [--stop-on-eof]");
                    System.exit(2);
                }
            }
        }
        boolean temporary = data == null;
        Path home = temporary ? Files.createTempDirectory("search-engine-") : data;
        Files.createDirectories(home.resolve("config"));

        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "embedjoin-search-engine")
            .put("node.name", "search-engine")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", Integer.toString(port))
            .put("transport.port", "0")
            // A developer's disk may be nearly full; a test index must still take writes.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .put("action.auto_create_index", true)
            .build();

        LogConfigurator.configureESLogging();
        LogConfigurator.configureWithoutConfig(settings);
        Environment environment = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "search-engine");
        long started = System.nanoTime();
        Node node;
        try {
            node = new ClasspathPluginsNode(environment, List.of(Netty4Plugin.class, RootPlugin.class));
        } catch (RuntimeException e) {
            if (temporary) {
                delete(home);
            }
            throw e;
        }
        // From here on the stop hook closes the node and removes its data, however the JVM ends.
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> stop(node, home, temporary, stopped), "search-engine-stop"));
        node.start();

        InetSocketAddress address = node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress().address();
        String url = "http://127.0.0.1:" + address.getPort();
        awaitAnswer(url);
        System.err.printf("search-engine: answering at %s after %.1f s%n", url, (System.nanoTime() - started) / 1e9);
        System.out.println(url);
        System.out.flush();

        if (stopOnEof) {
            Thread watcher = new Thread(() -> {
                try (InputStream in = System.in) {
                    while (in.read() != -1) {
                        // Input is ignored; only its end matters.
                    }
                } catch (IOException ignored) {
                    // A broken stdin is an end too.
                }
                System.exit(0); // runs the shutdown hook
            }, "search-engine-stdin");
            watcher.setDaemon(true);
            watcher.start();
        }
        stopped.await();
    }

    /** Polls {@code GET /} until it answers 200: the HTTP layer is bound before the node has a cluster state. */
    private static void awaitAnswer(String url) throws Exception {
        long deadline = System.nanoTime() + READY_TIMEOUT.toNanos();
        while (true) {
            try {
                HttpURLConnection connection = (HttpURLConnection) URI.create(url + "/_cluster/health?wait_for_status=yellow&timeout=10s")
                    .toURL()
                    .openConnection();
                connection.setConnectTimeout(1000);
                connection.setReadTimeout(15000);
                int status = connection.getResponseCode();
                connection.disconnect();
                if (status == 200) {
                    return;
                }
            } catch (IOException notYet) {
                // Not answering yet.
            }
            if (System.nanoTime() > deadline) {
                throw new IllegalStateException("the node did not answer at " + url + " within " + READY_TIMEOUT);
            }
            Thread.sleep(100);
        }
    }

    private static void stop(Node node, Path home, boolean temporary, CountDownLatch stopped) {
        try {
            node.prepareForClose();
            node.close();
            node.awaitClose(30, TimeUnit.SECONDS);
        } catch (Exception e) {
            System.err.println("search-engine: error while stopping: " + e);
        }
        if (temporary) {
            delete(home);
        }
        stopped.countDown();
    }

    private static void delete(Path dir) {
        try (Stream<Path> paths = Files.walk(dir)) {
            paths.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        } catch (IOException e) {
            System.err.println("search-engine: could not remove " + dir + ": " + e);
        }
    }
}
